"""The query pipeline: example geometries to query chip embeddings, and the search of an index with them."""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from osgeo import gdal, ogr

from . import get_logger
from .crs import grid_scale
from .encoder import OnnxEncoder, default_model_path, file_sha256
from .errors import CancelledError, GridError, LookalikeError, RasterError, SearchError, SearchIndexError
from .grid import Bounds, TileGrid, gsd_in_units, polygons_of, quiet_gdal, repaired_polygons
from .index import TileIndex
from .parameters import (
    Geometry,
    PathLike,
    _bounds_to_wkt,
    _geometry_to_wkt,
    _normalised_path,
    _parse_geometry,
    cut_to_surroundings,
    transform_geometry_wkt,
)
from .raster import (
    DEFAULT_MIN_VALID_FRACTION,
    SKIP_MOSTLY_INVALID,
    RasterSource,
    _same_crs,
    chip_skip_reason,
    is_missing_local_file,
    open_raster_quietly,
    vrt_member_files,
)
from .search import (
    DEFAULT_MAX_OVERLAP,
    DEFAULT_STRATEGY,
    Match,
    example_embeddings,
    negative_example_warnings,
    search,
)

LOGGER = get_logger("pipeline")

# A query is an example of what to find, an object or a few, so more tiles than this mean a
# query drawn at the wrong zoom. The bound also keeps reading and embedding a query short.
# NOTE: 256 is a judgement (16 x 16 tiles), not a measured limit.
MAX_QUERY_TILES = 256
# A region up to this fraction of a tile longer than a whole number of tiles gets no extra tile
# along that axis, so its tiles leave at most half of that fraction uncovered at each end. A box
# of one tile drawn on a map in another CRS comes back a little larger (0.4 % from UTM through
# Web Mercator), and without the slack it took four nearly equal query tiles instead of one.
QUERY_TILE_SLACK = 0.02
# A polygon's covering grid may hold this many times MAX_QUERY_TILES before its tiles are tested
# against the polygon: a thin diagonal polygon covers few of its grid's tiles.
MAX_QUERY_GRID_FACTOR = 16


# -- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryChips:
    """Embeddings of query chips and where each chip was read, in the query raster's grid CRS."""

    embeddings: np.ndarray
    footprints: list[Bounds]
    crs_wkt: str
    # Query tiles of the geometry's part over other indexed rasters, each with its grid CRS. They
    # were not read, but a match there would still show the example.
    footprints_elsewhere: list[tuple[Bounds, str]] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        # Unpacks as (embeddings, footprints), the two values most callers need.
        return iter((self.embeddings, self.footprints))

    def excluded_footprints(self) -> list[tuple[Bounds, str]]:
        """Return every query tile of the geometry, read or not, with its CRS.

        A match that overlaps one of them shows the example.
        """
        return [(bounds, self.crs_wkt) for bounds in self.footprints] + list(self.footprints_elsewhere)


def _manifest_of(index_or_manifest: Union[TileIndex, Mapping[str, Any]]) -> Mapping[str, Any]:
    if isinstance(index_or_manifest, TileIndex):
        return index_or_manifest.manifest
    if isinstance(index_or_manifest, Mapping) and "sources" in index_or_manifest:
        return index_or_manifest
    raise SearchIndexError(
        f"{type(index_or_manifest).__name__} is not an index; pass a TileIndex or its manifest dict."
    )


def _query_stretch(manifest: Mapping[str, Any], source: RasterSource, value_scale: float) -> dict[str, Any]:
    """Return the stretch the index used for this raster, or a new one for a raster not indexed."""
    path = _normalised_path(source.path)
    for record in manifest["sources"]:
        # NOTE: sources are matched by the file their path resolves to, so a copy of an indexed raster gets
        # its own stretch (identical for 8-bit data, close for percentile stretches).
        if _same_source_path(record.get("path"), path) and tuple(record.get("band_indexes", ())) == tuple(
            source.band_indexes
        ):
            stretch = record.get("value_stretch")
            if stretch is not None:
                return dict(stretch)
    return source.value_stretch(value_scale)


def embed_query(
    index_or_manifest: Union[TileIndex, Mapping[str, Any]],
    encoder: OnnxEncoder,
    source: Union[RasterSource, PathLike],
    geometry: Geometry,
    crs_wkt: str,
    is_cancelled: Optional[Callable[[], bool]] = None,
    complete_from_index: bool = True,
) -> QueryChips:
    """Read and embed the query chips for one geometry, at the index's GSD and tile size.

    ``geometry`` is ``(xmin, ymin, xmax, ymax)`` or WKT (POINT, POLYGON, MULTIPOLYGON) in
    ``crs_wkt``. A point gives the tile centred on it. A region that fits in one tile (with
    ``QUERY_TILE_SLACK``) gives one chip centred on the region. A larger region gives the fewest
    tiles that cover it, spread from edge to edge (see :func:`_tile_starts`), each a separate
    query chip. Chips that are mostly nodata are dropped.

    The raster may be an indexed source or any other raster. Indexed sources are read with the
    stretch stored in the index, so query and tiles see the same values. Tiles off the raster
    are left out before reading; at most ``MAX_QUERY_TILES`` tiles may remain. With
    ``complete_from_index``, a chip that reaches past the raster is completed from the index's
    other rasters in its CRS with its bands (see :func:`_read_across_neighbours`); pass False
    when the caller chose the raster to read. ``is_cancelled`` is polled before each chip is read.

    Raises:
        SearchIndexError: the index is empty, was built with another encoder, or ``source`` is
            one of its rasters and no longer exists.
        SearchError: every chip of the geometry is nodata, or it covers too many tiles.
        CancelledError: ``is_cancelled`` returned True.
    """
    manifest = _manifest_of(index_or_manifest)
    if not manifest["sources"]:
        raise SearchIndexError("The index has no sources yet; build it before querying.")
    built_with = manifest["encoder"]
    if built_with.get("checksum") != encoder.checksum:
        raise SearchIndexError(
            f"The index was built with encoder '{built_with.get('name')}' but the query uses "
            f"'{encoder.name}'; query with the index's encoder."
        )
    index_grid = TileGrid.from_dict(manifest["sources"][0]["grid"])
    if not isinstance(source, RasterSource):
        _check_indexed_raster_present(index_or_manifest, os.fspath(source))
    raster = source if isinstance(source, RasterSource) else RasterSource(os.fspath(source),
                                                                          _band_indexes_for(manifest, source))
    try:
        if len(raster.band_indexes) != encoder.spec.band_count:
            raise SearchError(
                f"raster {raster.path!r} gives {len(raster.band_indexes)} bands {list(raster.band_indexes)} but "
                f"encoder {encoder.name} takes {encoder.spec.band_count}; open the raster with "
                f"{encoder.spec.band_count} band_indexes."
            )
        stretch = _query_stretch(manifest, raster, encoder.spec.value_scale)
        grid_crs_wkt = raster.grid_crs_wkt()
        raster_bounds = _raster_bounds(raster, grid_crs_wkt)
        query_grid = _query_grid(index_grid, grid_crs_wkt, raster_bounds)
        wkt = valid_region_wkt(_geometry_to_wkt(geometry))
        footprints = _query_footprints(wkt, crs_wkt, grid_crs_wkt, query_grid, raster_bounds, raster.path)
        if len(footprints) > MAX_QUERY_TILES:
            raise SearchError(_too_many_tiles_message(len(footprints), query_grid, raster.path))
        footprints_elsewhere = _footprints_off_raster(manifest, wkt, crs_wkt, raster.path, raster_bounds,
                                                      grid_crs_wkt)
        chips = []
        embedded = []
        kept_footprints = []
        best_valid_fraction = 0.0
        # Listed when a chip first needs them: comparing the CRS of every raster of a large mosaic
        # costs more than most queries, whose chips lie inside one raster.
        neighbours: Optional[list[Mapping[str, Any]]] = None if complete_from_index else []
        for bounds in footprints:
            if is_cancelled is not None and is_cancelled():
                raise CancelledError("The query was cancelled while its chips were read.")
            chip, valid = raster.read_chip(bounds, grid_crs_wkt, index_grid.tile_size_px, stretch)
            if not valid.all():
                if neighbours is None:
                    neighbours = _neighbouring_sources(manifest, raster)
                if neighbours:
                    chip, valid = _read_across_neighbours(raster, neighbours, bounds, grid_crs_wkt,
                                                          index_grid.tile_size_px, stretch, chip, valid)
            reason = chip_skip_reason(chip, valid, encoder.spec.value_scale)
            if reason == SKIP_MOSTLY_INVALID:
                valid_fraction = float(np.count_nonzero(valid)) / valid.size
                best_valid_fraction = max(best_valid_fraction, valid_fraction)
                LOGGER.info("Dropping query chip %s: %.0f %% valid pixels", bounds, 100 * valid_fraction)
                continue
            chips.append(chip)
            kept_footprints.append(bounds)
            # Embedding a batch at a time keeps one batch of chips in memory, not the whole query.
            if len(chips) == encoder.batch_size:
                embedded.append(encoder.encode(np.stack(chips)))
                chips = []
    finally:
        if raster is not source:
            raster.close()
    if chips:
        embedded.append(encoder.encode(np.stack(chips)))
    if not embedded:
        raise SearchError(_no_query_chip_message(raster.path, best_valid_fraction, index_grid.tile_ground_size_m,
                                                 len(footprints)))
    return QueryChips(embeddings=np.concatenate(embedded), footprints=kept_footprints, crs_wkt=grid_crs_wkt,
                      footprints_elsewhere=footprints_elsewhere)


def _check_indexed_raster_present(index_or_manifest: Union[TileIndex, Mapping[str, Any]], path: str) -> None:
    """Raise a SearchIndexError naming the index when ``path`` is one of its rasters and that file is gone."""
    sources = _manifest_of(index_or_manifest)["sources"]
    if not is_missing_local_file(path) or not any(_same_source_path(record.get("path"), path) for record in sources):
        return
    index_name = f"index {index_or_manifest.folder}" if isinstance(index_or_manifest, TileIndex) else "index"
    raise SearchIndexError(
        f"The raster {path}, which the {index_name} was built from, is not found: it was moved, renamed or "
        "deleted. Put it back at that path, or read the examples from another copy of the same imagery "
        "(the raster to read from, RASTER in Processing), or build the index again from where the raster is now."
    )


def _neighbouring_sources(manifest: Mapping[str, Any], raster: RasterSource) -> list[Mapping[str, Any]]:
    """Return the other indexed rasters a query chip of ``raster`` could be completed from.

    They are those in its CRS read with the same bands, as the tiles of one mosaic delivered as
    separate files are. Rasters that are missing now are left out. A raster that is not in the
    index (another date, say) gets none: its pixels must not be mixed with the index's.
    """
    if not any(_same_source_path(record.get("path"), raster.path) for record in manifest["sources"]):
        return []
    neighbours = []
    for record in manifest["sources"]:
        path = record.get("path")
        if not isinstance(path, str) or _same_source_path(path, raster.path) or not os.path.exists(path):
            continue
        if tuple(record.get("band_indexes") or ()) != tuple(raster.band_indexes):
            continue
        try:
            if not _same_crs(str(record.get("crs_wkt")), raster.crs_wkt):
                continue
        except LookalikeError:
            continue
        neighbours.append(record)
    return neighbours


def _read_across_neighbours(
    raster: RasterSource,
    neighbours: Sequence[Mapping[str, Any]],
    bounds: Bounds,
    grid_crs_wkt: str,
    size_px: int,
    stretch: Mapping[str, Any],
    chip: np.ndarray,
    valid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a chip that reaches past ``raster`` from a mosaic of it and the neighbours under the chip.

    An example drawn where two files of one mosaic meet would otherwise be read from one of them,
    with the rest of its chip left empty (27 % valid at the corner of four files, so the query was
    rejected). The mosaic is a VRT in memory with an alpha band, so what no file covers stays
    invalid, and the chip keeps the stretch of ``raster``. Returns the chip read from ``raster`` when no
    neighbour lies under it or the mosaic adds no valid pixel.
    """
    chip_bounds = _bounds_within(_bounds_to_wkt(bounds), grid_crs_wkt, raster.crs_wkt,
                                 (-math.inf, -math.inf, math.inf, math.inf))
    if chip_bounds is None:
        return chip, valid
    under_chip = [
        record["path"] for record in neighbours
        if _overlaps(chip_bounds, record.get("bounds"))
    ]
    if not under_chip:
        return chip, valid
    mosaic_path = f"/vsimem/lookalike_query_{uuid.uuid4().hex}.vrt"
    try:
        with quiet_gdal():
            mosaic = gdal.BuildVRT(mosaic_path, [raster.path, *under_chip], addAlpha=True)
        if mosaic is None:
            return chip, valid
        mosaic = None
        mosaic_source = RasterSource(mosaic_path, raster.band_indexes)
        try:
            mosaic_chip, mosaic_valid = mosaic_source.read_chip(bounds, grid_crs_wkt, size_px, stretch)
        finally:
            mosaic_source.close()
    except LookalikeError as error:
        LOGGER.info("The query chip %s could not be read across %s: %s", bounds, under_chip, error)
        return chip, valid
    finally:
        gdal.Unlink(mosaic_path)
    if np.count_nonzero(mosaic_valid) <= np.count_nonzero(valid):
        return chip, valid
    LOGGER.info("Query chip %s read across %s and %s", bounds, raster.path, ", ".join(under_chip))
    return mosaic_chip, mosaic_valid


def _overlaps(first: Sequence[float], second: Any) -> bool:
    if not isinstance(second, (list, tuple)) or len(second) != 4:
        return False
    return first[0] < second[2] and second[0] < first[2] and first[1] < second[3] and second[1] < first[3]


# SHA-256 of source files by (path, size, modification time), so that a file is hashed once per
# change instead of at every search.
_SOURCE_CHECKSUMS: dict[tuple[str, int, int], str] = {}


def changed_source_warnings(index: TileIndex) -> list[str]:
    """Return a warning for each indexed raster file whose content changed after it was indexed.

    A file whose size and modification time still equal those in the manifest is taken as
    unchanged without reading it. Otherwise its SHA-256 decides, because copying a folder often
    gives files a new time. For a VRT mosaic the files it references are checked, not the VRT
    itself (see :func:`~lookalike.core.raster._file_stamp`). Sources indexed before the manifest
    kept size and time, missing files (reported where they are read) and connection strings are
    not checked.
    """
    warnings = []
    for source in index.sources:
        path = str(source.get("path") or "")
        if _file_changed(path, source):
            warnings.append(
                f"Raster {path} changed after it was indexed: the index contains embeddings of its earlier pixels, "
                "while examples drawn over it are read from the current ones, so the scores compare the two. "
                "Build the index again to search the raster as it is now."
            )
        if isinstance(source.get("member_files"), list):
            warnings.extend(_changed_mosaic_warnings(path, source["member_files"]))
    return warnings


def _changed_mosaic_warnings(path: str, recorded_members: Sequence[Any]) -> list[str]:
    """Return warnings for a VRT mosaic whose files changed, went missing or are others than when indexed."""
    # A hand-edited manifest may hold entries that are no records; they name no file to check.
    records = [(str(member.get("path") or ""), member) for member in recorded_members if isinstance(member, dict)]
    recorded_paths = [member_path for member_path, _ in records if member_path]
    changed = [member_path for member_path, member in records if member_path and _file_changed(member_path, member)]
    missing = [member_path for member_path in recorded_paths if not os.path.exists(member_path)]

    current = vrt_member_files(path) if os.path.isfile(path) else None
    added = [member_path for member_path in current or [] if member_path not in recorded_paths]
    no_longer_read = [member_path for member_path in recorded_paths
                      if current is not None and member_path not in current and member_path not in missing]

    warnings = []
    consequence = ("the index contains embeddings of the earlier pixels, while examples drawn over the mosaic are "
                   "read from the current ones. Build the index again to search the mosaic as it is now.")
    if changed:
        warnings.append(f"{_count_files(changed)} of the VRT mosaic {path} changed after it was indexed "
                        f"({', '.join(changed)}): {consequence}")
    if missing:
        if len(missing) == 1:
            subject = f"The file {missing[0]} of the VRT mosaic {path} is"
        else:
            subject = f"The files {', '.join(missing)} of the VRT mosaic {path} are"
        warnings.append(f"{subject} missing, so examples and chips over them cannot be read. Put the files back, or "
                        "build the index again.")
    if added or no_longer_read:
        parts = []
        if added:
            parts.append(f"now also {', '.join(added)}")
        if no_longer_read:
            parts.append(f"no longer {', '.join(no_longer_read)}")
        details = "; ".join(parts)
        warnings.append(f"The VRT mosaic {path} reads other files than when it was indexed ({details}): "
                        f"{consequence}")
    return warnings


def _file_changed(path: str, record: Mapping[str, Any]) -> bool:
    """Tell whether the local file at ``path`` differs from the size, time and SHA-256 in ``record``."""
    if "file_mtime_ns" not in record or not os.path.isfile(path):
        return False
    info = os.stat(path)
    if (info.st_size, info.st_mtime_ns) == (record.get("file_size_bytes"), record.get("file_mtime_ns")):
        return False
    key = (path, info.st_size, info.st_mtime_ns)
    if key not in _SOURCE_CHECKSUMS:
        _SOURCE_CHECKSUMS[key] = file_sha256(Path(path))
    return _SOURCE_CHECKSUMS[key] != record.get("checksum")


def _count_files(paths: Sequence[str]) -> str:
    return "A file" if len(paths) == 1 else f"{len(paths)} files"


def _footprints_off_raster(
    manifest: Mapping[str, Any],
    wkt: str,
    crs_wkt: str,
    raster_path: str,
    raster_bounds: Optional[Bounds],
    grid_crs_wkt: str,
) -> list[tuple[Bounds, str]]:
    """Return the query tiles, on the other indexed rasters, of a geometry's part beyond the raster it is read from.

    ``wkt`` is already repaired (:func:`valid_region_wkt`). Only the part off that raster counts,
    so a region over two dates of one place adds nothing. A part too large for query tiles on a
    raster is excluded there by its bounding box. A part that cannot be placed on a raster
    (outside its CRS's area of use) adds nothing for it.
    """
    if raster_bounds is None:
        return []
    geometry = ogr.CreateGeometryFromWkt(wkt)
    if geometry is None:
        return []
    try:
        read_area = ogr.CreateGeometryFromWkt(
            transform_geometry_wkt(_bounds_to_wkt(raster_bounds), grid_crs_wkt, crs_wkt))
    except GridError:
        return []
    # NOTE: a raster that ends at the antimeridian, seen from a query in degrees, has bounds
    # that span the globe, so nothing of the query is off it and this returns nothing.
    with quiet_gdal():
        rest = geometry.Difference(read_area) if read_area is not None else None
    if rest is not None and geometry.GetDimension() >= 2:
        rest = polygons_of(rest)
    if rest is None or rest.IsEmpty():
        return []
    rest_wkt = rest.ExportToWkt()
    footprints: list[tuple[Bounds, str]] = []
    for record in manifest["sources"]:
        if _same_source_path(record.get("path"), raster_path):
            continue
        path = str(record.get("path", ""))
        try:
            footprints += _footprints_on(rest_wkt, crs_wkt, TileGrid.from_dict(record["grid"]), path)
        except LookalikeError as error:
            LOGGER.info("The query's part off %s is not placed on %s: %s", raster_path, path, error)
    return footprints


def _footprints_on(wkt: str, crs_wkt: str, grid: TileGrid, path: str) -> list[tuple[Bounds, str]]:
    """Return the query tiles of ``wkt`` on one raster's grid, or its bounding box when they are too many."""
    try:
        tiles = _query_footprints(wkt, crs_wkt, grid.crs_wkt, grid, grid.bounds, path)
    except SearchError:
        # More query tiles than a query may have: the part's bounding box stands for them.
        box = _bounds_within(wkt, crs_wkt, grid.crs_wkt, grid.bounds)
        return [] if box is None else [(box, grid.crs_wkt)]
    return [(bounds, grid.crs_wkt) for bounds in tiles]


def _bounds_within(wkt: str, crs_wkt: str, to_crs_wkt: str, limits: Bounds) -> Optional[Bounds]:
    """Return the bounding box of ``wkt`` in ``to_crs_wkt``, cut to ``limits``, or None when it misses them."""
    xmin, xmax, ymin, ymax = ogr.CreateGeometryFromWkt(transform_geometry_wkt(wkt, crs_wkt, to_crs_wkt)).GetEnvelope()
    xmin, ymin = max(xmin, limits[0]), max(ymin, limits[1])
    xmax, ymax = min(xmax, limits[2]), min(ymax, limits[3])
    return (xmin, ymin, xmax, ymax) if xmin < xmax and ymin < ymax else None


def indexed_source_for_geometry(
    index_or_manifest: Union[TileIndex, Mapping[str, Any]], wkt: str, crs_wkt: str
) -> str:
    """Return the path of the indexed raster that contains the geometry's centroid, else the one it overlaps most.

    A box dragged past the raster's edge has its centroid off the raster but still shows imagery.
    """
    sources = _manifest_of(index_or_manifest)["sources"]
    if not sources:
        raise SearchError("The index has no rasters yet; build it before searching.")
    wkt = valid_region_wkt(wkt)
    best_path, best_area = "", 0.0
    for record in sources:
        xmin, ymin, xmax, ymax = record["bounds"]
        near_wkt = cut_to_surroundings(wkt, crs_wkt, record["bounds"], record["crs_wkt"])
        if near_wkt is None:
            # The region covers the whole raster.
            area = (xmax - xmin) * (ymax - ymin)
            if area > best_area:
                best_path, best_area = record["path"], area
            continue
        try:
            geometry = ogr.CreateGeometryFromWkt(transform_geometry_wkt(near_wkt, crs_wkt, record["crs_wkt"]))
        except GridError:
            # Outside the area of use of this raster's CRS, so not on this raster.
            continue
        centroid = geometry.Centroid()
        if xmin <= centroid.GetX() <= xmax and ymin <= centroid.GetY() <= ymax:
            return record["path"]
        if geometry.GetDimension() < 2:
            # Points and lines have no area to compare.
            continue
        footprint = ogr.CreateGeometryFromWkt(
            f"POLYGON(({xmin} {ymin},{xmax} {ymin},{xmax} {ymax},{xmin} {ymax},{xmin} {ymin}))"
        )
        overlap = geometry.Intersection(footprint)
        area = overlap.GetArea() if overlap is not None and overlap.GetDimension() == 2 else 0.0
        if area > best_area:
            best_path, best_area = record["path"], area
    if best_path:
        return best_path
    raise SearchError(
        "The query lies outside every indexed raster; draw it over the imagery of the index "
        f"({', '.join(Path(record['path']).name for record in sources)}). If it does lie there on the map, "
        "check the CRS of its layer: coordinates read in another CRS than theirs land elsewhere."
    )


def valid_region_wkt(wkt: str) -> str:
    """Return ``wkt`` with a self-intersecting polygon replaced by the region its outline encloses.

    A polygon drawn with crossing edges is invalid, and OGR's Intersection() of such a polygon
    returns nothing, which made a query around a raster look as if it missed every raster.

    Raises:
        GridError: ``wkt`` is not valid WKT.
        SearchError: the polygon encloses no area.
    """
    geometry = _parse_geometry(wkt)
    if geometry.GetDimension() < 2:
        return wkt
    with quiet_gdal():
        # GEOS reports each self-intersection as a warning on stderr.
        repaired = geometry if geometry.IsValid() else repaired_polygons(geometry)
    if repaired is None or repaired.IsEmpty() or not repaired.GetArea() > 0:
        raise SearchError(
            "The query polygon encloses no area: its points lie on one line, or it has fewer than three "
            "distinct points. Draw a polygon around the object, or click a point."
        )
    return wkt if repaired is geometry else repaired.ExportToWkt()


def _raster_bounds(raster: RasterSource, grid_crs_wkt: str) -> Optional[Bounds]:
    """Return the raster's bounds in the grid CRS, or None when they cannot be transformed there."""
    try:
        return raster.bounds_in(grid_crs_wkt)
    except RasterError:
        # Reading each chip still finds the ones off the raster.
        return None


def _query_grid(index_grid: TileGrid, grid_crs_wkt: str, raster_bounds: Optional[Bounds]) -> TileGrid:
    """Return the index grid with its GSD in the query raster's grid CRS units.

    The index GSD is in its first grid's CRS units. The query raster's grid CRS may have other
    units (feet) or another scale (Web Mercator), so the GSD goes through ground metres.
    """
    if raster_bounds is None:
        return index_grid
    raster_scale = grid_scale(grid_crs_wkt, raster_bounds)
    return dataclasses.replace(
        index_grid,
        crs_wkt=grid_crs_wkt,
        gsd=gsd_in_units(index_grid.gsd, index_grid.units_per_metre, raster_scale.units_per_metre),
        scale_factor=raster_scale.scale_factor,
    )


def _too_many_tiles_message(tile_count: int, index_grid: TileGrid, path: str) -> str:
    return (
        f"The query covers {tile_count} tiles of {index_grid.tile_ground_size_m:g} m on {path!r}, more than "
        f"the {MAX_QUERY_TILES} a query may have; draw it around the objects to look for, zoomed in."
    )


def _no_query_chip_message(path: str, best_valid_fraction: float, tile_ground_size_m: float,
                           chip_count: int = 1) -> str:
    if best_valid_fraction == 0.0:
        return f"The query geometry covers no valid pixels of {path!r}; draw it over the imagery."
    # The geometry may well sit on image pixels: the chip is a whole tile around it, and that
    # tile reaches past the raster edge or into nodata.
    valid_percent = f"{100 * best_valid_fraction:.0f} %"
    chips = (
        f"The query chip ({tile_ground_size_m:.4g} m wide, centred on the geometry) has only {valid_percent}"
        if chip_count == 1 else
        f"The {chip_count} query chips ({tile_ground_size_m:.4g} m wide, covering the geometry) have at most "
        f"{valid_percent}"
    )
    return (
        f"{chips} valid pixels of {path!r}, below the threshold of "
        f"{100 * DEFAULT_MIN_VALID_FRACTION:.0f} %: most of {'it' if chip_count == 1 else 'each'} lies outside "
        "the raster or on nodata. Draw the "
        "query at least half a tile away from the raster edge and from nodata areas."
    )


def _same_source_path(recorded: Any, path: str) -> bool:
    """Compare an indexed source path with another spelling of a path, by the file it resolves to."""
    if not isinstance(recorded, str):
        return False
    if recorded == path:
        return True
    return os.path.exists(recorded) and os.path.exists(path) and os.path.realpath(recorded) == os.path.realpath(path)


def _band_indexes_for(manifest: Mapping[str, Any], path: PathLike) -> Optional[tuple[int, ...]]:
    """Return the bands to read a query raster with: its own mapping when it is indexed.

    A raster outside the index gets the band numbers the analyst chose for the index (a false
    colour composite, for example), when every source shares them and the raster has those
    bands. Otherwise it picks its bands itself, by colour interpretation, as the build does.
    """
    normalised = _normalised_path(os.fspath(path))
    for record in manifest["sources"]:
        if _same_source_path(record.get("path"), normalised):
            return tuple(record["band_indexes"])
    chosen = (manifest.get("build_parameters") or {}).get("band_indexes")
    mappings = {tuple(record.get("band_indexes") or ()) for record in manifest["sources"]}
    if not chosen or len(mappings) != 1 or tuple(chosen) not in mappings:
        return None
    band_count = _band_count(os.fspath(path))
    if band_count is None or max(chosen) > band_count:
        return None
    LOGGER.info("Reading bands %s of %s, the bands chosen for the index", list(chosen), path)
    return tuple(chosen)


def _band_count(path: str) -> Optional[int]:
    # Opening the raster for the query reports any error, so this look-ahead stays quiet.
    dataset = open_raster_quietly(path)
    return None if dataset is None else dataset.RasterCount


def _query_footprints(
    wkt: str,
    crs_wkt: str,
    grid_crs_wkt: str,
    index_grid: TileGrid,
    raster_bounds: Optional[Bounds] = None,
    raster_path: str = "",
) -> list[Bounds]:
    """Return the query tiles of a geometry: one centred tile for a point or a small region, else the
    tiles covering the region's part on the raster (``raster_bounds``, in the grid CRS).

    Raises:
        SearchError: the geometry type is not supported, or the region covers more than
            ``MAX_QUERY_TILES`` tiles of the raster.
    """
    wkt = valid_region_wkt(wkt)
    near_wkt = wkt if raster_bounds is None else cut_to_surroundings(wkt, crs_wkt, raster_bounds, grid_crs_wkt)
    if near_wkt is None:
        # The region covers the whole raster, which is already in the grid CRS.
        geometry = _parse_geometry(_bounds_to_wkt(raster_bounds))
    else:
        geometry = _parse_geometry(transform_geometry_wkt(near_wkt, crs_wkt, grid_crs_wkt))
    tile = index_grid.tile_ground_size
    xmin, xmax, ymin, ymax = geometry.GetEnvelope()
    geometry_type = ogr.GT_Flatten(geometry.GetGeometryType())
    if geometry_type not in (ogr.wkbPoint, ogr.wkbMultiPoint, ogr.wkbPolygon, ogr.wkbMultiPolygon):
        raise SearchError(
            f"query geometry of type {geometry.GetGeometryName()} is not supported; use points, "
            "rectangles or polygons."
        )
    half = tile / 2.0
    if geometry_type == ogr.wkbMultiPoint:
        # Each point is an example of its own, as a point layer's features are.
        points = [geometry.GetGeometryRef(number) for number in range(geometry.GetGeometryCount())]
        if len(points) > MAX_QUERY_TILES:
            raise SearchError(_too_many_tiles_message(len(points), index_grid, raster_path))
        return [(point.GetX() - half, point.GetY() - half, point.GetX() + half, point.GetY() + half)
                for point in points]
    if geometry_type == ogr.wkbPoint or (xmax - xmin <= tile * (1 + QUERY_TILE_SLACK)
                                         and ymax - ymin <= tile * (1 + QUERY_TILE_SLACK)):
        centre_x, centre_y = (xmin + xmax) / 2.0, (ymin + ymax) / 2.0
        return [(centre_x - half, centre_y - half, centre_x + half, centre_y + half)]
    if raster_bounds is not None:
        # Tiles off the raster hold no valid pixel, and a polygon that crosses the antimeridian
        # can come out of the transformation spanning the globe.
        xmin, ymin = max(xmin, raster_bounds[0]), max(ymin, raster_bounds[1])
        xmax, ymax = min(xmax, raster_bounds[2]), min(ymax, raster_bounds[3])
        if xmin >= xmax or ymin >= ymax:
            return []
    lefts = _tile_starts(xmin, xmax, tile)
    # Rows run from the top down, as a grid's do.
    tops = [ymax + ymin - start for start in _tile_starts(ymin, ymax, tile)]
    # Counting before the tiles are listed stops a huge region early.
    if len(lefts) * len(tops) > MAX_QUERY_TILES * MAX_QUERY_GRID_FACTOR:
        raise SearchError(_too_many_tiles_message(len(lefts) * len(tops), index_grid, raster_path))
    footprints = [(left, top - tile, left + tile, top) for top in tops for left in lefts]
    if geometry_type == ogr.wkbPolygon and _is_rectangle(geometry):
        return footprints
    return [bounds for bounds in footprints if _overlap_area(geometry, bounds) > 0.0]


def _tile_starts(low: float, high: float, tile: float) -> list[float]:
    """Return where the tiles covering ``[low, high]`` along one axis start, spread from end to end.

    The fewest tiles that cover the span (up to ``QUERY_TILE_SLACK``) are spaced evenly, the first
    starting at ``low`` and the last ending at ``high``, so neighbours overlap where the span is not
    a whole number of tiles. A region 3 % wider than one tile thus gives two tiles close together,
    both close to the one tile centred on a narrower region. Tiles laid on a fixed grid from the
    corner instead put the second tile almost entirely outside the region, so a 161 m box on 160 m
    tiles found other matches than a 159 m box.
    """
    count = max(1, math.ceil((high - low) / tile - QUERY_TILE_SLACK))
    if count == 1:
        return [(low + high - tile) / 2.0]
    step = (high - low - tile) / (count - 1)
    return [low + number * step for number in range(count)]


def _overlap_area(geometry: ogr.Geometry, bounds: Bounds) -> float:
    overlap = geometry.Intersection(_parse_geometry(_bounds_to_wkt(bounds)))
    return overlap.GetArea() if overlap is not None and overlap.GetDimension() == 2 else 0.0


def _is_rectangle(geometry: ogr.Geometry) -> bool:
    xmin, xmax, ymin, ymax = geometry.GetEnvelope()
    envelope_area = (xmax - xmin) * (ymax - ymin)
    return envelope_area > 0 and math.isclose(geometry.GetArea(), envelope_area, rel_tol=1e-9)


def run_search(
    index_folder: PathLike,
    source: PathLike,
    positives: Sequence[Geometry],
    negatives: Sequence[Geometry] = (),
    k: int = 10,
    crs_wkt: Optional[str] = None,
    encoder_path: Optional[PathLike] = None,
    max_overlap: float = DEFAULT_MAX_OVERLAP,
    min_score: Optional[float] = None,
    strategy: str = DEFAULT_STRATEGY,
) -> list[Match]:
    """Search an index for tiles like the positive geometries of one raster, unlike the negatives.

    The demo and plain Python use it. The dock and the Processing search read each example from
    the indexed raster under it, so they call :func:`embed_query` themselves.
    Geometries are ``(xmin, ymin, xmax, ymax)`` tuples or WKT in ``crs_wkt`` (default: the CRS
    of ``source``); each is read with :func:`embed_query`. Matches that overlap a positive's
    footprint are dropped, so the query object itself does not come back. ``encoder_path``
    defaults to :func:`index_encoder_path`.

    Raises:
        SearchIndexError: the index is missing, damaged or was built with another encoder.
        SearchError: no positive geometry was given or one covers only nodata.
    """
    _check_geometry_list(positives, "positives")
    _check_geometry_list(negatives, "negatives")
    if not positives:
        raise SearchError("No positive geometry was given; draw at least one example of what to find.")
    index = TileIndex.open(index_folder)
    encoder = OnnxEncoder(encoder_path or index_encoder_path(index))
    index.check_encoder(encoder.name, encoder.checksum)
    for warning in changed_source_warnings(index):
        LOGGER.warning(warning)
    _check_indexed_raster_present(index, os.fspath(source))
    raster = RasterSource(os.fspath(source), _band_indexes_for(index.manifest, source))
    try:
        query_crs_wkt = crs_wkt or raster.crs_wkt
        positive_chips = [embed_query(index, encoder, raster, geometry, query_crs_wkt) for geometry in positives]
        negative_chips = [embed_query(index, encoder, raster, geometry, query_crs_wkt) for geometry in negatives]
    finally:
        raster.close()

    if negative_chips:
        # Judged on the rows the search combines, as the dock and Processing do.
        positive_rows = example_embeddings([chips.embeddings for chips in positive_chips])
        negative_rows = example_embeddings([chips.embeddings for chips in negative_chips])
        for warning in negative_example_warnings(positive_rows, negative_rows, strategy):
            LOGGER.warning(warning)
    matches = search_query_chips(
        index, positive_chips, negative_chips, k=k, max_overlap=max_overlap, min_score=min_score, strategy=strategy
    )
    LOGGER.info("Search in %s with %d positive and %d negative chips returned %d matches", index_folder,
                sum(len(chips.embeddings) for chips in positive_chips),
                sum(len(chips.embeddings) for chips in negative_chips), len(matches))
    return matches


def _check_geometry_list(geometries: Any, name: str) -> None:
    """Reject one geometry given where a list of them is expected, before it is read item by item."""
    if isinstance(geometries, np.ndarray) and geometries.ndim == 2:
        return
    is_sequence = isinstance(geometries, Sequence) and not isinstance(geometries, (str, bytes))
    is_one_box = is_sequence and len(geometries) == 4 and all(
        isinstance(value, (int, float, np.number)) and not isinstance(value, bool) for value in geometries
    )
    if not is_sequence or is_one_box:
        given_text = repr(geometries)
        if len(given_text) > 80:
            given_text = given_text[:77] + "..."
        if is_one_box or isinstance(geometries, (str, bytes)):
            advice = f"wrap a single geometry in a list, e.g. {name}=[geometry]"
        else:
            advice = f"pass a list or tuple, e.g. {name}=list(geometries)"
        raise SearchError(
            f"{name} must be a list of geometries, each a (xmin, ymin, xmax, ymax) tuple or WKT, but got {given_text}; "
            f"{advice}."
        )


def search_query_chips(
    index: TileIndex,
    positive_chips: Sequence[QueryChips],
    negative_chips: Sequence[QueryChips] = (),
    **search_options: Any,
) -> list[Match]:
    """Search ``index`` with embedded query chips; ``search_options`` go to :func:`core.search.search`.

    Tiles that overlap a positive's query tiles, read or not, show the example itself, so they are dropped.
    """
    strategy = search_options.get("strategy", DEFAULT_STRATEGY)
    positive_embeddings = example_embeddings([chips.embeddings for chips in positive_chips], strategy)
    negative_embeddings = (
        example_embeddings([chips.embeddings for chips in negative_chips], strategy) if negative_chips else None
    )
    exclude = [footprint for chips in positive_chips for footprint in chips.excluded_footprints()]
    return search(index, positive_embeddings, negative_embeddings, exclude=exclude, **search_options)


def index_encoder_path(index: TileIndex, fallbacks: Sequence[PathLike] = ()) -> Path:
    """Return the ONNX file to query ``index`` with.

    That is the encoder file the build recorded while it exists. Otherwise it is the first of
    ``fallbacks`` (an encoder the user chose) or of the bundled model whose checksum is the
    index's, because an index built by another install of the plugin records that install's path.

    Raises:
        SearchIndexError: the recorded file is missing and no candidate is the index's model.
    """
    recorded = (index.build_parameters or {}).get("encoder_path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    bundled = default_model_path()
    if not recorded:
        # Builds with the bundled encoder record no path.
        return bundled
    checksum = index.encoder_info.get("checksum")
    for candidate in (*[Path(fallback) for fallback in fallbacks if fallback], bundled):
        if candidate.is_file() and file_sha256(candidate) == checksum:
            return candidate
    raise SearchIndexError(
        f"The index was built with the encoder file {recorded} (encoder '{index.encoder_info.get('name', '')}'), "
        "which no longer exists; choose that ONNX file where it is now as the encoder, or rebuild the index."
    )
