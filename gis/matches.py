"""Result layers: the schema of ranked matches shared by the dock and Processing, and its writers.

Every caller that turns a ``core.search.Match`` list into features goes through this module, so
the dock's layer, Processing's output and the demo's GeoPackage carry the same fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProject,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
)

from ..core import get_logger
from ..core.errors import LookalikeError
from ..core.index import check_output_outside_lookalike_folders
from .compat import FIELD_DOUBLE, FIELD_INT, FIELD_LONG, FIELD_STRING

LOGGER = get_logger("gis.matches")

# Field names are part of the output format: styles, models and scripts refer to them.
FIELD_RANK = "rank"
FIELD_SCORE = "score"
FIELD_TILE_ID = "tile_id"
FIELD_SOURCE = "source"
FIELD_ROW = "row"
FIELD_COL = "col"
FIELD_ENCODER = "encoder"
FIELD_QUERY = "query"

DEFAULT_LAYER_NAME = "Lookalike matches"


def match_fields() -> QgsFields:
    """Build the fields of a match layer: rank, score, tile_id, source, row, col, encoder, query.

    ``rank`` starts at 1 for the best match. ``score`` is the similarity that ``core.search``
    returns (higher is more similar). ``source`` is the path of the raster the tile was read
    from, ``row`` and ``col`` the tile's position in that raster's grid, ``encoder`` the model
    name and ``query`` a free-text label of the query that produced the match.
    """
    fields = QgsFields()
    fields.append(QgsField(FIELD_RANK, FIELD_INT))
    fields.append(QgsField(FIELD_SCORE, FIELD_DOUBLE))
    fields.append(QgsField(FIELD_TILE_ID, FIELD_LONG))
    fields.append(QgsField(FIELD_SOURCE, FIELD_STRING))
    fields.append(QgsField(FIELD_ROW, FIELD_INT))
    fields.append(QgsField(FIELD_COL, FIELD_INT))
    fields.append(QgsField(FIELD_ENCODER, FIELD_STRING))
    fields.append(QgsField(FIELD_QUERY, FIELD_STRING))
    return fields


def matches_to_features(
    matches: Iterable,
    fields: QgsFields,
    destination_crs: QgsCoordinateReferenceSystem,
    *,
    encoder_name: str = "",
    query_label: str = "",
    transform_context: Optional[QgsCoordinateTransformContext] = None,
) -> list[QgsFeature]:
    """Convert matches to polygon features of their tile footprints in ``destination_crs``.

    Each match's ``bounds`` are in its own ``crs_wkt`` (the grid CRS of its source raster), so
    matches from several rasters of one index can end up in one layer. ``fields`` must contain
    the fields of :func:`match_fields`; other fields stay null.

    Raises:
        LookalikeError: a match's CRS is invalid or its footprint cannot be transformed to
            ``destination_crs``.
    """
    context = transform_context or QgsProject.instance().transformContext()
    transforms: dict[str, QgsCoordinateTransform] = {}
    features = []
    for match in matches:
        transform = transforms.get(match.crs_wkt)
        if transform is None:
            transform = _transform_from_wkt(match.crs_wkt, destination_crs, context)
            transforms[match.crs_wkt] = transform

        geometry = QgsGeometry.fromRect(QgsRectangle(*match.bounds))
        # In the grid's own CRS the footprint stays the tile's rectangle of five vertices.
        if not transform.isShortCircuited():
            # A rectangle in a projected CRS becomes a curved quadrilateral elsewhere, so the
            # footprint is densified first and its sides stay close to the true edges.
            geometry = geometry.densifyByCount(8)
            try:
                geometry.transform(transform)
            except QgsCsException as error:
                raise LookalikeError(
                    f"The footprint of match rank {match.rank} (tile {match.tile_id}) cannot be "
                    f"transformed to {destination_crs.authid() or destination_crs.description()}: "
                    f"{error}; choose a destination CRS that covers the indexed rasters."
                ) from error

        feature = QgsFeature(fields)
        feature.setGeometry(geometry)
        feature[FIELD_RANK] = int(match.rank)
        feature[FIELD_SCORE] = float(match.score)
        feature[FIELD_TILE_ID] = int(match.tile_id)
        feature[FIELD_SOURCE] = str(match.source_path)
        feature[FIELD_ROW] = int(match.row)
        feature[FIELD_COL] = int(match.col)
        feature[FIELD_ENCODER] = encoder_name
        feature[FIELD_QUERY] = query_label
        features.append(feature)
    return features


def matches_to_memory_layer(
    matches: Sequence,
    name: str = DEFAULT_LAYER_NAME,
    crs: Optional[QgsCoordinateReferenceSystem] = None,
    *,
    encoder_name: str = "",
    query_label: str = "",
) -> QgsVectorLayer:
    """Create an in-memory polygon layer of the matches, one feature per match in rank order.

    With no ``crs`` the layer takes the CRS of the first match, or EPSG:4326 when there are no
    matches, so an empty result still gives a valid layer.
    """
    if crs is None:
        if matches:
            crs = QgsCoordinateReferenceSystem.fromWkt(matches[0].crs_wkt)
        else:
            crs = QgsCoordinateReferenceSystem("EPSG:4326")
    if not crs.isValid():
        raise LookalikeError(
            f"The CRS for the match layer {name!r} is invalid; pass a valid "
            "QgsCoordinateReferenceSystem, e.g. the project CRS."
        )

    layer = QgsVectorLayer(f"Polygon?crs={crs.authid() or 'EPSG:4326'}", name, "memory")
    # An authid-less CRS (custom WKT) cannot go in the URI, so it is set on the layer instead.
    layer.setCrs(crs)
    provider = layer.dataProvider()
    fields = match_fields()
    provider.addAttributes(fields.toList())
    layer.updateFields()

    features = matches_to_features(
        matches, layer.fields(), crs, encoder_name=encoder_name, query_label=query_label
    )
    if not provider.addFeatures(features):
        raise LookalikeError(
            f"Adding {len(features)} matches to the memory layer {name!r} failed: "
            f"{provider.lastError()}."
        )
    layer.updateExtents()
    return layer


# Files of one shapefile: writing matches.shp replaces matches.dbf, matches.prj and the others too.
# QGIS's writer removes these spatial-index and projection sidecars as well, in any letter case.
SHAPEFILE_MEMBER_SUFFIXES = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".qpj", ".sbn", ".sbx", ".idm", ".ind")
# Formats that keep the fields of a layer as written, so that a field added later is visible.
EXACT_SCHEMA_DRIVERS = frozenset({"GPKG", "ESRI Shapefile", "GeoJSON", "FlatGeobuf", "CSV"})
# GDAL lists a CSV's geometry column (GEOMETRY=AS_WKT) among its fields.
CSV_GEOMETRY_FIELD = "wkt"

# A CSV keeps each tile footprint as WKT in a column, and its field types in a .csvt file beside
# it, so that the file opens in QGIS as a polygon layer with numeric rank and score.
CSV_LAYER_OPTIONS = ("GEOMETRY=AS_WKT", "CREATE_CSVT=YES")


def files_replaced(path: Union[str, Path], driver_name: Optional[str] = None) -> list[Path]:
    """Return the existing files that writing matches to ``path`` would replace."""
    path = Path(path)
    if path.suffix.lower() == ".shp" or driver_name == "ESRI Shapefile":
        suffixes = set(SHAPEFILE_MEMBER_SUFFIXES)
    elif path.suffix.lower() == ".csv" or driver_name == "CSV":
        # The field types and the CRS that GDAL writes beside the table (CSV_LAYER_OPTIONS).
        suffixes = {".csv", ".csvt", ".prj"}
    else:
        return [path] if path.is_file() else []
    folder = path.parent
    if not folder.is_dir():
        return []
    # Compared without letter case: data.SHP and data.DBF go as well as data.shp, and GDAL
    # writes m.csvt beside m.CSV.
    return sorted(entry for entry in folder.iterdir()
                  if entry.is_file() and entry.stem.lower() == path.stem.lower() and entry.suffix.lower() in suffixes)


def dataset_sharing_files(path: Union[str, Path], driver_name: Optional[str] = None) -> Optional[Path]:
    """Return the main file of another dataset that reads the ``.prj`` a write to ``path`` would write.

    A shapefile and a CSV of the same name share the ``.prj`` that GDAL writes beside each, so
    exporting one would give the other the new layer's CRS, also when it had no ``.prj`` before.
    None when no such dataset exists.
    """
    path = Path(path)
    writes_shapefile = path.suffix.lower() == ".shp" or driver_name == "ESRI Shapefile"
    writes_csv = path.suffix.lower() == ".csv" or driver_name == "CSV"
    if not (writes_shapefile or writes_csv) or not path.parent.is_dir():
        return None
    other_suffix = ".csv" if writes_shapefile else ".shp"
    for entry in sorted(path.parent.iterdir()):
        if entry.is_file() and entry.stem.lower() == path.stem.lower() and entry.suffix.lower() == other_suffix:
            return entry
    return None


def other_files_of_prj(path: Union[str, Path], driver_name: Optional[str] = None) -> list[Path]:
    """Return the files beside ``path`` of its name that a write there leaves, when the write replaces a ``.prj``.

    Rasters with a world file and ASCII grids, for example, read the ``.prj`` of their name as
    their CRS, so the analyst decides whether it may be replaced. Empty when no ``.prj`` would be replaced.
    """
    replaced = files_replaced(path, driver_name)
    if not any(file.suffix.lower() == ".prj" for file in replaced):
        return []
    path = Path(path)
    return sorted(entry for entry in path.parent.iterdir()
                  if entry.is_file() and entry.stem.lower() == path.stem.lower() and entry not in replaced
                  and entry != path)


def free_layer_name(path: Union[str, Path], base_name: str = "matches") -> str:
    """Return ``base_name``, or ``base_name_2`` and on, whichever no layer of the file ``path`` has.

    Layer names are compared without letter case, as GeoPackage does.
    """
    taken_names = _taken_layer_names(path)
    name, number = base_name, 1
    while name.lower() in taken_names:
        number += 1
        name = f"{base_name}_{number}"
    return name


def _taken_layer_names(path: Union[str, Path]) -> set[str]:
    """Return the lower-case names of the layers and tables of the file ``path``, none for a missing file."""
    dataset = open_dataset_quietly(path)
    names = set()
    if dataset is not None:
        names = {dataset.GetLayer(position).GetName().lower() for position in range(dataset.GetLayerCount())}
    # A GeoPackage's raster and attribute tables share the name space of its layers.
    names.update(name.lower() for name in _geopackage_extra_tables(path, []))
    return names


def open_dataset_quietly(path: Union[str, Path], kinds: int = gdal.OF_VECTOR) -> Optional[gdal.Dataset]:
    """Open ``path`` read-only as a dataset of ``kinds`` (GDAL's ``OF_*`` flags), or return None.

    GDAL prints nothing either way.
    """
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        return gdal.OpenEx(str(path), kinds | gdal.OF_READONLY)
    except RuntimeError:
        # Raised instead of returning None when the caller has enabled gdal.UseExceptions().
        return None
    finally:
        gdal.PopErrorHandler()


def layers_not_from_lookalike(path: Union[str, Path], layer_name: str = "") -> Optional[list[str]]:
    """Return the layers and tables of the existing vector file ``path`` that are not Lookalike match layers.

    A match layer has the fields rank, score and tile_id. In formats that keep a layer's fields as
    written, it has no other fields than a search writes, so a field the analyst added makes it
    theirs. With ``layer_name``, only the layer of that name counts, compared without letter case
    as GeoPackage does, and an empty list means there is none. Returns None when ``path`` is not
    a vector file with layers (a raster, a text file, a damaged file).
    """
    dataset = open_dataset_quietly(path)
    if dataset is None or dataset.GetLayerCount() == 0:
        return None
    exact_schema = dataset.GetDriver().ShortName in EXACT_SCHEMA_DRIVERS
    written_field_names = {name.lower() for name in match_fields().names()}
    if dataset.GetDriver().ShortName == "CSV":
        written_field_names.add(CSV_GEOMETRY_FIELD)
    required_field_names = {FIELD_RANK, FIELD_SCORE, FIELD_TILE_ID}
    foreign = []
    for layer_position in range(dataset.GetLayerCount()):
        layer = dataset.GetLayer(layer_position)
        if layer_name and layer.GetName().lower() != layer_name.lower():
            continue
        definition = layer.GetLayerDefn()
        field_names = {definition.GetFieldDefn(field).GetName().lower() for field in range(definition.GetFieldCount())}
        if not required_field_names <= field_names or (exact_schema and not field_names <= written_field_names):
            foreign.append(layer.GetName())
    if not layer_name and dataset.GetDriver().ShortName == "GPKG":
        layer_names = [dataset.GetLayer(position).GetName() for position in range(dataset.GetLayerCount())]
        foreign.extend(name for name in _geopackage_extra_tables(path, layer_names) if name not in foreign)
    return foreign


# Tables every GeoPackage that GDAL writes may contain, besides its layers and their R-tree indexes.
GEOPACKAGE_SYSTEM_TABLES = frozenset({
    "gpkg_contents", "gpkg_extensions", "gpkg_geometry_columns", "gpkg_ogr_contents", "gpkg_spatial_ref_sys",
    "gpkg_tile_matrix", "gpkg_tile_matrix_set", "sqlite_sequence", "sqlite_stat1",
})


def _geopackage_extra_tables(path: Union[str, Path], layer_names: Sequence[str]) -> list[str]:
    """Return the tables and views of a GeoPackage that are neither its layers nor GDAL's own tables.

    Raster tables, metadata (``gpkg_metadata``), styles and other extensions are found here, which
    OGR does not list as layers, but which replacing the file deletes too. An unreadable file gives
    an empty list, because the caller reads it through OGR first.
    """
    import sqlite3

    layers = {name.lower() for name in layer_names}
    try:
        connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = [row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
        finally:
            connection.close()
    except sqlite3.Error:
        return []
    return [name for name in names
            if name.lower() not in GEOPACKAGE_SYSTEM_TABLES and name.lower() not in layers
            and not any(name.lower().startswith(f"rtree_{layer}_") for layer in layers)]


def geopackage_tables_not_from_lookalike(path: Union[str, Path]) -> Optional[list[str]]:
    """Return the layers and tables of the GeoPackage ``path`` that Lookalike did not write, or None for another file.

    Unlike :func:`layers_not_from_lookalike`, a GeoPackage that holds only raster or attribute
    tables (which OGR does not list as layers) gives their names, not None.
    """
    foreign = layers_not_from_lookalike(path)
    if foreign is not None:
        return foreign
    if _open_geopackage(path) is None:
        return None
    return _geopackage_extra_tables(path, [])


def _open_geopackage(path: Union[str, Path]) -> Optional[gdal.Dataset]:
    """Open ``path`` read-only as a GeoPackage of any content, or return None, quietly."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        return gdal.OpenEx(str(path), gdal.OF_RASTER | gdal.OF_VECTOR | gdal.OF_READONLY, allowed_drivers=["GPKG"])
    except RuntimeError:
        return None
    finally:
        gdal.PopErrorHandler()


def write_matches(
    layer: QgsVectorLayer,
    path: Union[str, Path],
    *,
    overwrite: bool = False,
    driver_name: Optional[str] = None,
    layer_name: Optional[str] = None,
    add_to_file: bool = False,
) -> Path:
    """Write a match layer to a vector file and return its path.

    The OGR driver comes from the file extension (``.gpkg``, ``.shp``, ``.geojson``, ...) unless
    ``driver_name`` is given. An existing file is replaced only with ``overwrite=True``, and
    then the whole file is replaced, not only the layer of that name. For a shapefile, each of
    its files counts (see :func:`files_replaced`): a ``.dbf`` of that name is not replaced
    without ``overwrite`` either. With ``add_to_file`` the matches become the layer
    ``layer_name`` of an existing GeoPackage, whose other layers stay.

    Raises:
        LookalikeError: the file exists and ``overwrite`` is false, the file shares its ``.prj``
            with another dataset, the extension names no vector format, or the writer fails.
    """
    path = Path(path)
    if path.is_dir():
        raise LookalikeError(f"The output path {path} is a folder; choose a file name such as {path / 'matches.gpkg'}.")
    check_output_outside_lookalike_folders(path)
    if add_to_file:
        return _add_layer_to_geopackage(layer, path, layer_name)
    sharing = dataset_sharing_files(path, driver_name)
    if sharing is not None:
        raise LookalikeError(
            f"Writing {path} would replace {path.with_suffix('.prj').name}, the CRS file that {sharing} uses too; "
            "choose another file name."
        )
    replaced = files_replaced(path, driver_name)
    if replaced and not overwrite:
        existing = ", ".join(str(file) for file in replaced)
        raise LookalikeError(
            f"The output file {existing} already exists; choose another path or pass overwrite=True "
            "to replace it."
        )
    if not path.parent.is_dir():
        raise LookalikeError(
            f"The folder {path.parent} does not exist, so {path.name} cannot be written there; create the "
            "folder or choose a path in an existing one."
        )

    if driver_name is None:
        driver_name = QgsVectorFileWriter.driverForExtension(path.suffix)
    if not driver_name:
        raise LookalikeError(
            f"The extension {path.suffix!r} of {path} names no vector format that QGIS can write; "
            "use .gpkg, .shp, .geojson or pass driver_name."
        )

    for file in replaced:
        # Removing the old files first gives the same result with every driver, whatever each
        # driver does with other layers of an existing file.
        file.unlink()
        LOGGER.info("Replacing the existing file %s", file)

    error_code, error_message = _run_vector_writer(
        layer, path, driver_name, layer_name or layer.name() or "matches",
        QgsVectorFileWriter.ActionOnExistingFile.CreateOrOverwriteFile,
        CSV_LAYER_OPTIONS if driver_name == "CSV" else (),
    )
    if error_code != QgsVectorFileWriter.WriterError.NoError:
        raise LookalikeError(
            f"Writing the match layer to {path} with the {driver_name} driver failed: "
            f"{error_message or error_code}."
        )
    LOGGER.info("Wrote %d matches to %s", layer.featureCount(), path)
    return path


def _add_layer_to_geopackage(layer: QgsVectorLayer, path: Path, layer_name: Optional[str]) -> Path:
    if not layer_name:
        raise LookalikeError(f"Adding the matches to {path} needs the name of the new layer; pass layer_name.")
    dataset = _open_geopackage(path)
    if dataset is None:
        raise LookalikeError(f"{path} is not a GeoPackage, so the matches cannot be added to it as a layer; choose "
                             "a .gpkg file or a new file name.")
    dataset = None
    if layer_name.lower() in _taken_layer_names(path):
        raise LookalikeError(f"{path} already has a layer '{layer_name}'; choose another layer name.")
    # CreateOrOverwriteLayer writes the new layer into the existing file and keeps its other layers.
    error_code, error_message = _run_vector_writer(
        layer, path, "GPKG", layer_name, QgsVectorFileWriter.ActionOnExistingFile.CreateOrOverwriteLayer
    )
    if error_code != QgsVectorFileWriter.WriterError.NoError:
        # A write that stopped half way (a full disk) may have left part of the new layer behind.
        _delete_layer_quietly(path, layer_name)
        raise LookalikeError(f"Adding the match layer '{layer_name}' to {path} failed: {error_message or error_code}.")
    LOGGER.info("Added %d matches to %s as the layer %s", layer.featureCount(), path, layer_name)
    return path


def _delete_layer_quietly(path: Path, layer_name: str) -> None:
    """Delete the layer ``layer_name`` from the GeoPackage ``path`` where it exists; log a failure."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        dataset = gdal.OpenEx(str(path), gdal.OF_VECTOR | gdal.OF_UPDATE)
        if dataset is None:
            return
        for position in range(dataset.GetLayerCount()):
            if dataset.GetLayer(position).GetName().lower() == layer_name.lower():
                dataset.DeleteLayer(position)
                break
        dataset = None
    except RuntimeError as error:
        LOGGER.warning("The unfinished layer %s could not be removed from %s: %s", layer_name, path, error)
    finally:
        gdal.PopErrorHandler()


def _run_vector_writer(
    layer: QgsVectorLayer,
    path: Path,
    driver_name: str,
    layer_name: str,
    action: Any,
    layer_options: Sequence[str] = (),
) -> tuple[Any, str]:
    """Write ``layer`` to ``path`` with QGIS's vector writer; return its error code and message."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = driver_name
    options.fileEncoding = "UTF-8"
    options.layerName = layer_name
    options.actionOnExistingFile = action
    options.layerOptions = list(layer_options)
    error_code, error_message, _written_path, _written_layer = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, str(path), QgsProject.instance().transformContext(), options
    )
    return error_code, error_message


def _transform_from_wkt(
    crs_wkt: str,
    destination_crs: QgsCoordinateReferenceSystem,
    context: QgsCoordinateTransformContext,
) -> QgsCoordinateTransform:
    source_crs = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
    if not source_crs.isValid():
        raise LookalikeError(
            f"A match carries a CRS that QGIS cannot read ({crs_wkt[:80]!r}...); rebuild the "
            "index so that its grids store valid WKT."
        )
    if not destination_crs.isValid():
        raise LookalikeError(
            "The destination CRS for the match features is invalid; pass a valid "
            "QgsCoordinateReferenceSystem, e.g. the project CRS."
        )
    return QgsCoordinateTransform(source_crs, destination_crs, context)
