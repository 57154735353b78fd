"""Chip export: cut image chips under match footprints out of a raster, plus a labels CSV.

The chips contain the values the encoder receives, not raw sensor values: each is read with
``core.raster.RasterSource.read_chip`` under the raster's value stretch at a value scale of 255,
so 8-bit imagery keeps its values and other data types get the 2-98 % stretch described in
``core.raster``. A fourth (alpha) band marks valid pixels (255) and nodata or off-raster pixels
(0). That makes the chips ready to label, view or train on without further scaling.

Shared by the Processing algorithm ``lookalike:exportchips`` and the dock's export action.
"""

from __future__ import annotations

import codecs
import csv
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsFeatureRequest,
    QgsProject,
    QgsVectorLayer,
)

from ..core import get_logger
from ..core.errors import CancelledError, LookalikeError, RasterError
from ..core.files import open_temporary_beside
from ..core.index import check_output_outside_lookalike_folders
from ..core.raster import RasterSource, is_missing_local_file
from . import matches

LOGGER = get_logger("gis.chip_export")

FORMAT_GEOTIFF = "GTiff"
FORMAT_PNG = "PNG"
FILE_EXTENSIONS = {FORMAT_GEOTIFF: "tif", FORMAT_PNG: "png"}

LABELS_CSV_NAME = "labels.csv"
# The names this module gives chips; only files so named and listed in an earlier labels.csv are
# removed when a new export replaces that list.
CHIP_NAME_PATTERN = re.compile(r"chip_\d{5}\.(tif|png)")
# Chips are written into a folder of this prefix inside the chip folder, then moved into place.
STAGING_PREFIX = ".lookalike-chips-"
# Delimiters of a labels.csv saved again by a spreadsheet; a tie between them goes to the first.
CSV_DELIMITERS = (",", ";", "\t")
# Excel can write the delimiter as a first line such as "sep=;".
# LibreOffice quotes it when it saves such a file again.
EXCEL_SEPARATOR_LINE = re.compile(r'"?sep=(.)"?', re.IGNORECASE)
# 8-bit output: the chip values are the encoder's raw units at this value scale.
CHIP_VALUE_SCALE = 255.0
ALPHA_VALID = 255

# A footprint read at native resolution becomes at most this many pixels on its long side, so a
# footprint drawn over a whole scene cannot allocate gigabytes.
MAX_NATIVE_CHIP_SIZE_PX = 4096

# Attributes of a match layer copied into the labels CSV when the layer has them.
MATCH_COLUMNS = (
    matches.FIELD_RANK,
    matches.FIELD_SCORE,
    matches.FIELD_TILE_ID,
    matches.FIELD_SOURCE,
    matches.FIELD_ROW,
    matches.FIELD_COL,
)
# The bounds and crs describe the chip as cut from chip_source, which differs from the match's
# source when the chips are read from another raster (another date of the place).
CHIP_SOURCE_COLUMN = "chip_source"
CSV_COLUMNS = ("chip", "label", "feature_id", *MATCH_COLUMNS, "xmin", "ymin", "xmax", "ymax", "crs",
               CHIP_SOURCE_COLUMN)
# Columns every labels.csv of this module has, whatever the layer: a file lacking one is not ours.
EXPORT_MARK_COLUMNS = ("chip", "feature_id", "xmin", "ymin", "xmax", "ymax", "crs")


@dataclass(frozen=True)
class ChipRequest:
    """One chip to cut: a footprint's bounding box in a CRS, the raster to read and the CSV row.

    ``source_path`` is the GDAL path to read from. ``attributes`` contains the match fields that go
    into the CSV (absent ones are written empty).
    """

    feature_id: int
    bounds: tuple[float, float, float, float]
    crs_wkt: str
    crs_authid: str
    source_path: str
    label: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ChipExportReport:
    """Result of ``export_chips``: chip files in request order, the CSV path and the skipped requests."""

    folder: Path
    csv_path: Path
    chip_paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def written_count(self) -> int:
        return len(self.chip_paths)


def chip_requests_from_layer(
    layer: QgsVectorLayer,
    raster_path: Optional[str] = None,
    label: str = "",
    label_field: Optional[str] = None,
    feature_ids: Optional[Iterable[int]] = None,
    transform_context: Optional[QgsCoordinateTransformContext] = None,
) -> list[ChipRequest]:
    """Build one chip request per feature of a match layer (or of ``feature_ids``), best rank first.

    Each footprint is reprojected to the CRS of the raster it is read from, and its bounding box
    becomes the chip extent. With ``raster_path`` every chip comes from that raster. Without it,
    each feature's ``source`` field names the raster, as a match layer from ``gis.matches``
    records it. The CSV label is the value of ``label_field`` when given, else ``label``.

    Raises:
        LookalikeError: the layer has no ``source`` field and no raster is given, a label field
            is missing, a feature has no geometry, or a footprint cannot be reprojected.
    """
    field_names = layer.fields().names()
    if raster_path is None and matches.FIELD_SOURCE not in field_names:
        raise LookalikeError(
            f"Layer {layer.name()!r} has no {matches.FIELD_SOURCE!r} field naming the raster of each "
            "match; pass raster_path, the raster to read the chips from."
        )
    if label_field and label_field not in field_names:
        raise LookalikeError(
            f"Label field {label_field!r} not found in layer {layer.name()!r}; choose one of "
            f"{', '.join(field_names)}."
        )

    request = QgsFeatureRequest()
    if feature_ids is not None:
        request.setFilterFids(list(feature_ids))
    features = list(layer.getFeatures(request))
    if matches.FIELD_RANK in field_names:
        # Null ranks (hand-made features) go last, in feature-id order.
        features.sort(key=lambda feature: (_rank_sort_key(feature[matches.FIELD_RANK]), feature.id()))

    context = transform_context or QgsProject.instance().transformContext()
    layer_crs = layer.crs()
    crs_by_source: dict[str, QgsCoordinateReferenceSystem] = {}
    requests = []
    for feature in features:
        source_path = raster_path or str(feature[matches.FIELD_SOURCE] or "")
        if not source_path:
            raise LookalikeError(
                f"Feature {feature.id()} of layer {layer.name()!r} has an empty {matches.FIELD_SOURCE!r} "
                "field; pass raster_path, the raster to read the chips from."
            )
        if source_path not in crs_by_source:
            _check_raster_present(source_path, feature.id())
            crs_by_source[source_path] = _raster_crs(source_path)
        raster_crs = crs_by_source[source_path]

        geometry = feature.geometry()
        if geometry is None or geometry.isEmpty():
            raise LookalikeError(
                f"Feature {feature.id()} of layer {layer.name()!r} has no geometry; remove it or "
                "select only features with footprints."
            )
        if layer_crs != raster_crs:
            try:
                geometry.transform(QgsCoordinateTransform(layer_crs, raster_crs, context))
            except QgsCsException as error:
                raise LookalikeError(
                    f"The footprint of feature {feature.id()} cannot be reprojected from "
                    f"{layer_crs.authid()} to the CRS of {source_path}: {error}."
                ) from error
        box = geometry.boundingBox()
        if box.width() <= 0 or box.height() <= 0:
            raise LookalikeError(
                f"Feature {feature.id()} of layer {layer.name()!r} covers no area (a point, or a line along one "
                "axis), so it has no footprint to cut a chip from; export polygons, or buffer the features first "
                "(Vector > Geoprocessing Tools > Buffer)."
            )
        attributes = {name: feature[name] for name in MATCH_COLUMNS if name in field_names}
        requests.append(
            ChipRequest(
                feature_id=int(feature.id()),
                bounds=(box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()),
                crs_wkt=raster_crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL),
                crs_authid=raster_crs.authid(),
                source_path=source_path,
                label=str(feature[label_field]) if label_field else label,
                attributes=attributes,
            )
        )
    return requests


def export_chips(
    requests: Sequence[ChipRequest],
    folder: os.PathLike | str,
    image_format: str = FORMAT_GEOTIFF,
    chip_size_px: Optional[int] = None,
    band_indexes: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    is_cancelled: Optional[Callable[[], bool]] = None,
) -> ChipExportReport:
    """Write one chip per request into ``folder`` and a ``labels.csv`` that lists them.

    Chips are named ``chip_00001.<ext>`` in request order. ``chip_size_px`` makes every chip that
    many pixels square; None reads each footprint at the raster's native resolution (capped at
    ``MAX_NATIVE_CHIP_SIZE_PX`` on the long side). ``band_indexes`` are 1-based source bands,
    None picks RGB by colour interpretation as the index build does. GeoTIFF chips are
    georeferenced in the raster's CRS. PNG chips are not, so the CSV carries every chip's bounds
    and CRS. A footprint with no valid pixel (entirely off the raster or nodata) is skipped and
    reported instead of writing an empty chip. ``progress(done, total)`` is called after each
    chip and ``is_cancelled()`` is polled before each. ``labels.csv`` lists the chips of this
    run, and the chips an earlier ``labels.csv`` there listed are removed unless this run wrote
    them again. Columns the analyst added to that list stay with the rows of chips written again
    from the same footprint, under whatever chip number. Chips are moved into the folder only
    after the last one is written: a run that stops, fails or writes no chip (every footprint
    skipped) leaves the folder as it was, an earlier ``labels.csv`` and its chips included.

    Raises:
        LookalikeError: an unknown format, a bad chip size, an unwritable folder, a band mapping
            that PNG cannot store, or a raster that cannot be read.
        CancelledError: ``is_cancelled`` returned True, and the folder is as it was.
    """
    if image_format not in FILE_EXTENSIONS:
        raise LookalikeError(
            f"Chip format {image_format!r} is not supported; use {FORMAT_GEOTIFF!r} or {FORMAT_PNG!r}."
        )
    if chip_size_px is not None and (isinstance(chip_size_px, bool) or int(chip_size_px) != chip_size_px
                                     or chip_size_px < 1):
        raise LookalikeError(f"Chip size {chip_size_px!r} px is invalid; pass a whole number of pixels >= 1.")

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LookalikeError(f"The chip folder {folder} is a file; choose a folder path for the chips and labels.csv.")
    check_output_outside_lookalike_folders(folder, is_folder=True)
    # The folders this export creates, deepest first, are removed again if it fails.
    created_folders = []
    for place in (folder, *folder.parents):
        if place.exists():
            break
        created_folders.append(place)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LookalikeError(
            f"The chip folder {folder} cannot be created ({error}); choose a writable folder."
        ) from error
    try:
        return _export_into_folder(requests, folder, image_format, chip_size_px, band_indexes, progress, is_cancelled)
    except BaseException:
        # A failed export leaves no new empty folder behind either.
        for place in created_folders:
            if not place.is_dir() or any(place.iterdir()):
                break
            place.rmdir()
        raise


def _export_into_folder(
    requests: Sequence[ChipRequest],
    folder: Path,
    image_format: str,
    chip_size_px: Optional[int],
    band_indexes: Optional[Sequence[int]],
    progress: Optional[Callable[[int, int], None]],
    is_cancelled: Optional[Callable[[], bool]],
) -> ChipExportReport:
    """Run :func:`export_chips` in the existing ``folder``."""
    if not os.access(folder, os.W_OK):
        raise LookalikeError(f"The chip folder {folder} is not writable; choose a folder you can write to.")

    present_chips = _chip_names_in(folder)
    _check_sources_outside_chips(folder, requests, present_chips)
    report = ChipExportReport(folder=folder, csv_path=folder / LABELS_CSV_NAME)
    earlier_rows = _listed_chip_rows(report.csv_path)
    # Notes follow the footprint, which a new export may write under another chip number. The same
    # footprint can appear more than once (two dates of one place), so its rows are handed out in order.
    earlier_by_footprint: dict[Any, list[Mapping[str, Any]]] = {}
    for row in earlier_rows.values():
        earlier_by_footprint.setdefault(_footprint_key(row), []).append(row)
    _check_no_unlisted_chips(folder, len(requests), FILE_EXTENSIONS[image_format], earlier_rows, present_chips)
    # Chips are written beside the folder's files and moved into place only once every chip is
    # written, so that a run that stops midway replaces no chip of an earlier export.
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as error:
        raise LookalikeError(
            f"The chip folder {folder} is not writable ({error.strerror or error}); choose a folder you can write to."
        ) from error
    rows: list[dict[str, Any]] = []
    sources: dict[str, tuple[RasterSource, dict[str, Any]]] = {}
    total = len(requests)
    try:
        for position, request in enumerate(requests, start=1):
            if is_cancelled is not None and is_cancelled():
                raise CancelledError(
                    f"Chip export cancelled after {len(rows)} of {total} chips; {folder} was left as it was "
                    "before the export."
                )
            if request.source_path not in sources:
                _check_raster_present(request.source_path, request.feature_id)
                source = RasterSource(request.source_path, band_indexes)
                if image_format == FORMAT_PNG and len(source.band_indexes) not in (1, 3):
                    raise LookalikeError(
                        f"PNG chips hold 1 or 3 image bands plus alpha, but {len(source.band_indexes)} "
                        f"bands {list(source.band_indexes)} were chosen; choose 1 or 3 bands or export GeoTIFF."
                    )
                sources[request.source_path] = (source, source.value_stretch(CHIP_VALUE_SCALE))
            source, stretch = sources[request.source_path]

            chip_name = f"chip_{position:05d}.{FILE_EXTENSIONS[image_format]}"
            if _write_chip(source, stretch, request, staging / chip_name, image_format, chip_size_px):
                rows.append(_with_analyst_columns(_csv_row(chip_name, request), earlier_by_footprint))
            else:
                report.skipped.append((request.feature_id, f"no valid pixel of {request.source_path} under the "
                                                           "footprint (it lies outside that raster or over nodata)"))
                LOGGER.info("Skipped feature %d: no valid pixel of %s under its footprint",
                            request.feature_id, request.source_path)
            if progress is not None:
                progress(position, total)
        if not rows and total:
            # An export with nothing in it would replace an earlier one by an empty table.
            earlier_export_note = (f", so {report.csv_path} and the chips it lists are kept"
                                   if report.csv_path.exists() else "")
            raster_paths = ", ".join(sorted({request.source_path for request in requests}))
            raise LookalikeError(
                f"No chip was written: none of the {total} footprints has a valid pixel of {raster_paths} under "
                f"it{earlier_export_note}. Export footprints that lie over that raster, or choose the raster they "
                "were found in."
            )
        _check_no_notes_dropped(report.csv_path, earlier_by_footprint)
        try:
            _move_into_place(staging, folder)
        except OSError as error:
            raise LookalikeError(
                f"Moving the chips into {folder} failed ({error.strerror or error}); choose a folder you can write "
                "to, and export again."
            ) from error
        rewritten = {row["chip"] for row in rows}
        # Chips of the earlier export that this one did not overwrite would be listed nowhere.
        _remove_chips(folder, {name for name in earlier_rows if name not in rewritten})
        try:
            _write_csv(report.csv_path, rows)
        except OSError as error:
            raise LookalikeError(
                f"Writing {report.csv_path} failed ({error.strerror or error}); choose a folder you can write to, "
                "with free space."
            ) from error
        report.chip_paths = [folder / row["chip"] for row in rows]
    finally:
        for source, _stretch in sources.values():
            source.close()
        shutil.rmtree(staging, ignore_errors=True)
    LOGGER.info("Wrote %d chips and %s (%d skipped)", report.written_count, report.csv_path, len(report.skipped))
    return report


def _check_raster_present(path: str, feature_id: int) -> None:
    """Name a raster that was moved or deleted after the search that found the footprint."""
    if not is_missing_local_file(path):
        return
    raise LookalikeError(
        f"The raster {path} of feature {feature_id} is not found: it was moved, renamed or deleted after "
        "the search. Put it back at that path, or choose the raster to cut the chips from (RASTER in Processing)."
    )


def _write_chip(
    source: RasterSource,
    stretch: Mapping[str, Any],
    request: ChipRequest,
    path: Path,
    image_format: str,
    chip_size_px: Optional[int],
) -> bool:
    width_px, height_px = _chip_shape(source, request.bounds, chip_size_px)
    # read_chip reads squares, so a non-square footprint is read at its long side and cropped
    # back; both axes keep the same ground sample distance.
    side_px = max(width_px, height_px)
    xmin, ymin, xmax, ymax = request.bounds
    pixel_size = max(xmax - xmin, ymax - ymin) / side_px
    square = (xmin, ymax - side_px * pixel_size, xmin + side_px * pixel_size, ymax)
    chip, valid = source.read_chip(square, request.crs_wkt, side_px, stretch)
    chip = chip[:, :height_px, :width_px]
    valid = valid[:height_px, :width_px]
    if not valid.any():
        return False

    band_count = chip.shape[0]
    memory = gdal.GetDriverByName("MEM").Create("", width_px, height_px, band_count + 1, gdal.GDT_Byte)
    for band_number in range(1, band_count + 1):
        band = memory.GetRasterBand(band_number)
        band.WriteArray(np.clip(np.rint(chip[band_number - 1]), 0, 255).astype(np.uint8))
        if band_count == 3:
            band.SetColorInterpretation((gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)[band_number - 1])
        elif band_count == 1:
            band.SetColorInterpretation(gdal.GCI_GrayIndex)
    alpha = memory.GetRasterBand(band_count + 1)
    alpha.WriteArray(np.where(valid, ALPHA_VALID, 0).astype(np.uint8))
    alpha.SetColorInterpretation(gdal.GCI_AlphaBand)

    options: list[str] = []
    if image_format == FORMAT_GEOTIFF:
        memory.SetGeoTransform((xmin, pixel_size, 0.0, ymax, 0.0, -pixel_size))
        memory.SetProjection(request.crs_wkt)
        options = ["COMPRESS=DEFLATE", "ALPHA=YES"]
        if band_count == 3:
            options.append("PHOTOMETRIC=RGB")
    driver = gdal.GetDriverByName(image_format)
    written = driver.CreateCopy(str(path), memory, strict=0, options=options)
    if written is None:
        raise RasterError(
            f"Writing the chip {path.name} into {path.parent.parent} failed ({gdal.GetLastErrorMsg()}); check that "
            "the folder is writable and the disk has free space."
        )
    written.FlushCache()
    written = None
    return True


def _chip_shape(
    source: RasterSource, bounds: Sequence[float], chip_size_px: Optional[int]
) -> tuple[int, int]:
    xmin, ymin, xmax, ymax = bounds
    if xmax <= xmin or ymax <= ymin:
        raise LookalikeError(f"The footprint {tuple(bounds)} is empty; only polygons can be exported as chips.")
    if chip_size_px is not None:
        side = int(chip_size_px)
        # A fixed size applies to the long side, so non-square footprints keep their shape.
        if xmax - xmin >= ymax - ymin:
            return side, max(1, round(side * (ymax - ymin) / (xmax - xmin)))
        return max(1, round(side * (xmax - xmin) / (ymax - ymin))), side
    # Request bounds are in the raster's own CRS, so its pixel size gives the native resolution.
    pixel_width, pixel_height = source.pixel_size
    width_px = max(1, math.ceil((xmax - xmin) / pixel_width - 1e-6))
    height_px = max(1, math.ceil((ymax - ymin) / pixel_height - 1e-6))
    long_side = max(width_px, height_px)
    if long_side > MAX_NATIVE_CHIP_SIZE_PX:
        factor = MAX_NATIVE_CHIP_SIZE_PX / long_side
        width_px = max(1, round(width_px * factor))
        height_px = max(1, round(height_px * factor))
    return width_px, height_px


def _csv_row(chip_name: str, request: ChipRequest) -> dict[str, Any]:
    row: dict[str, Any] = {
        "chip": chip_name,
        "label": request.label,
        "feature_id": request.feature_id,
        "crs": request.crs_authid or request.crs_wkt,
        CHIP_SOURCE_COLUMN: request.source_path,
    }
    for name in MATCH_COLUMNS:
        value = request.attributes.get(name)
        row[name] = "" if value is None or _is_null(value) else value
    for name, value in zip(("xmin", "ymin", "xmax", "ymax"), request.bounds):
        row[name] = repr(float(value))
    return row


def _footprint_key(row: Mapping[str, Any]) -> Optional[tuple]:
    """Return the raster a row's chip was cut from, its CRS and bounds, rounded to match a spreadsheet's.

    None when the row lacks a readable bound. Rows of exports before the ``chip_source`` column
    name only the match's raster, which was then also the one the chip was cut from unless the
    export read another raster.
    """
    try:
        bounds = tuple(round(_spreadsheet_number(row[name]), 6) for name in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError):
        return None
    raster = row.get(CHIP_SOURCE_COLUMN) or row.get(matches.FIELD_SOURCE) or ""
    return (str(raster), str(row.get("crs") or ""), *bounds)


def _spreadsheet_number(value: Any) -> float:
    """Return a number of a ``labels.csv`` cell, also as a spreadsheet in a decimal-comma locale writes it."""
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        if text.count(",") == 1 and "." not in text:
            return float(text.replace(",", "."))
        raise


def _with_analyst_columns(
    row: dict[str, Any], earlier_by_footprint: dict[Any, list[Mapping[str, Any]]]
) -> dict[str, Any]:
    """Return ``row`` with the columns the analyst added to the next unused earlier row of its footprint.

    A label the analyst typed into that earlier row stays when this export brings none, as for an
    unmarked match. A label this export brings, from a relevance mark or the Label setting, replaces it.
    """
    earlier_rows = earlier_by_footprint.get(_footprint_key(row))
    if not earlier_rows:
        return row
    earlier = earlier_rows.pop(0)
    merged = {**row, **{name: value for name, value in earlier.items() if name not in CSV_COLUMNS}}
    if not merged.get("label") and earlier.get("label"):
        merged["label"] = earlier["label"]
    return merged


def _check_no_notes_dropped(csv_path: Path, unused_rows: dict[Any, list[Mapping[str, Any]]]) -> None:
    """Raise when earlier rows that this export leaves out contain values in columns the analyst added.

    ``unused_rows`` contains the earlier rows that no chip of this export took the columns of. Their
    chips are removed with them, and so would their notes be.
    """
    with_notes = sorted(
        str(row.get("chip"))
        for rows in unused_rows.values()
        for row in rows
        if any(name not in CSV_COLUMNS and not _is_null(value) and str(value).strip() for name, value in row.items())
    )
    if with_notes:
        listed = ", ".join(with_notes[:5]) + (f" and {len(with_notes) - 5} more" if len(with_notes) > 5 else "")
        raise LookalikeError(
            f"{csv_path} has notes in columns you added for {listed}, whose footprints this export does not "
            "contain, so replacing the earlier export would delete them. Export into another folder, or delete "
            "those rows from the file first."
        )


def _listed_chip_rows(csv_path: Path) -> dict[str, dict[str, Any]]:
    """Return the rows of an existing ``labels.csv`` by chip name, for chips still in its folder; {} without one.

    Spreadsheets save the file with a byte order mark, as UTF-16, in a Windows code page, with
    semicolons or tabs, with a ``sep=`` first line (Excel) or with carriage-return line ends, and
    each of these is read. A file without a ``chip`` column stops the export, because the chips
    of the earlier export would then be indistinguishable from the analyst's files.

    Raises:
        LookalikeError: the file cannot be read or has no ``chip`` column.
    """
    if not csv_path.exists() or csv_path.is_symlink():
        # A link is not an earlier export's list; the export replaces the link, not its target.
        return {}
    try:
        raw = csv_path.read_bytes()
    except OSError as error:
        raise LookalikeError(
            f"{csv_path} of an earlier export cannot be read ({error.strerror or error}); move it away or "
            "choose another folder."
        ) from error
    if b"\x00" in raw and not raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise LookalikeError(
            f"{csv_path} of an earlier export is not text in UTF-8 or a Windows code page (it contains NUL "
            "bytes, as UTF-16 without a byte order mark and binary files do); save it as CSV UTF-8, or move "
            "it away, or choose another folder."
        )
    text = _decoded_csv(raw)
    if not text.strip():
        return {}
    # splitlines() also ends lines at a lone carriage return, as old Mac spreadsheets write them.
    lines = text.splitlines()
    delimiter = _csv_delimiter(lines[0])
    if _separator_line(lines[0]):
        lines = lines[1:]
    try:
        reader = csv.DictReader(lines, delimiter=delimiter)
        if "chip" not in (reader.fieldnames or []):
            raise LookalikeError(
                f"{csv_path} has no 'chip' column in its first line, so the chips of an earlier export there are "
                "unknown; add that column, or move the file away, or choose another folder."
            )
        missing = [name for name in EXPORT_MARK_COLUMNS if name not in reader.fieldnames]
        if missing:
            # Another tool's list: its files are the analyst's, and replacing it would lose it.
            raise LookalikeError(
                f"{csv_path} was not written by a Lookalike chip export (it has no column {', '.join(missing)}), "
                "so it and the chips there could be another tool's; move them away or choose another folder."
            )
        present = _chip_names_in(csv_path.parent)
        # Columns the analyst added (notes, a second label) stay with their rows.
        columns = [*CSV_COLUMNS, *(name for name in reader.fieldnames if name and name not in CSV_COLUMNS)]
        return {
            row["chip"]: {column: row.get(column) or "" for column in columns}
            for row in reader
            if row.get("chip") in present
        }
    except csv.Error as error:
        raise LookalikeError(
            f"{csv_path} of an earlier export cannot be read as CSV ({error}); save it as CSV, or move it away, "
            "or choose another folder."
        ) from error


def _decoded_csv(raw: bytes) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _separator_line(line: str) -> Optional[re.Match]:
    # Only spaces are stripped, because the declared delimiter can be a tab.
    return EXCEL_SEPARATOR_LINE.fullmatch(line.strip(" "))


def _csv_delimiter(first_line: str) -> str:
    """Return the delimiter named by an Excel ``sep=`` line, or the commonest of comma, semicolon and tab."""
    declared = _separator_line(first_line)
    if declared:
        return declared.group(1)
    return max(CSV_DELIMITERS, key=first_line.count)


def check_chip_folder(folder: os.PathLike | str, chip_count: int, image_format: str = FORMAT_GEOTIFF) -> None:
    """Raise LookalikeError when an export of ``chip_count`` chips into ``folder`` would stop at its checks.

    Those are the checks :func:`export_chips` runs before it writes anything: a folder of
    Lookalike's, an unreadable or foreign ``labels.csv``, and chip-named files that no earlier
    ``labels.csv`` lists. A caller
    runs them before asking the analyst to confirm a non-empty folder.
    """
    folder = Path(folder)
    check_output_outside_lookalike_folders(folder, is_folder=True)
    if not folder.is_dir():
        return
    earlier_rows = _listed_chip_rows(folder / LABELS_CSV_NAME)
    _check_no_unlisted_chips(folder, chip_count, FILE_EXTENSIONS[image_format], earlier_rows, _chip_names_in(folder))


def _check_sources_outside_chips(folder: Path, requests: Sequence[ChipRequest], chip_names: set[str]) -> None:
    """Raise when a raster to read is one of the chip files ``chip_names`` of ``folder``, which the export replaces."""
    for source_path in dict.fromkeys(request.source_path for request in requests):
        path = Path(source_path)
        if path.name in chip_names and path.exists() and (folder / path.name).samefile(path):
            raise LookalikeError(
                f"The raster to read, {source_path}, is a chip in the chip folder {folder}, which this export "
                "replaces or removes; copy the raster elsewhere or choose another chip folder."
            )


def _check_no_unlisted_chips(
    folder: Path, count: int, extension: str, earlier_rows: Mapping[str, Any], chip_names: set[str]
) -> None:
    """Raise when the export would replace a chip file that no earlier ``labels.csv`` lists: it may be a user file.

    ``chip_names`` are the chip-named files now in ``folder``.
    """
    names = {f"chip_{position:05d}.{extension}" for position in range(1, count + 1)}
    unlisted = sorted(name for name in names & chip_names if name not in earlier_rows)
    if unlisted:
        named = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        raise LookalikeError(
            f"{folder} already contains {named}, which no labels.csv of an earlier Lookalike export there lists, "
            "so the export would replace files it did not write; move them away or choose another folder."
        )


def _chip_names_in(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir() if CHIP_NAME_PATTERN.fullmatch(path.name) and path.is_file()}


def _remove_chips(folder: Path, names: set[str]) -> None:
    for name in sorted(names):
        try:
            (folder / name).unlink()
        except OSError as error:
            LOGGER.warning("The earlier chip %s could not be removed (%s); delete it by hand", folder / name, error)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Move every file written into ``staging`` (chips and any GDAL sidecar) into ``folder``, replacing its namesakes.

    A renamed file replaces a symbolic link of its name, not the file the link points to.
    """
    for path in sorted(staging.iterdir()):
        os.replace(path, folder / path.name)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` with the standard columns first, then any other column a row has, atomically."""
    columns = list(CSV_COLUMNS)
    for row in rows:
        columns += [name for name in row if name not in columns]
    stream, temp_path = open_temporary_beside(path)
    try:
        with stream:
            writer = csv.DictWriter(stream, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temp_path, path)
    finally:
        if temp_path.exists():
            temp_path.unlink()


def _raster_crs(path: str) -> QgsCoordinateReferenceSystem:
    source = RasterSource(path)
    try:
        crs = QgsCoordinateReferenceSystem.fromWkt(source.crs_wkt)
    finally:
        source.close()
    if not crs.isValid():
        raise RasterError(f"QGIS cannot read the CRS of raster {path}; assign an EPSG CRS to it.")
    return crs


def _is_null(value: Any) -> bool:
    # QGIS returns NULL attributes as QVariant objects that compare false to everything but
    # report isNull().
    is_null = getattr(value, "isNull", None)
    return bool(is_null()) if callable(is_null) else False


def _rank_sort_key(value: Any) -> float:
    if value is None or _is_null(value):
        return math.inf
    return float(value)
