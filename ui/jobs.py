"""The work the dock's tasks run off the GUI thread: build an index, search it, read thumbnails.

Each ``*_work`` function takes plain values gathered on the main thread (never a widget or a
layer) plus the running ``LookalikeTask`` for progress and cancellation, and returns plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from osgeo import ogr
from qgis.PyQt.QtGui import QImage

from ..core import get_logger
from ..core.encoder import OnnxEncoder
from ..core.errors import CancelledError, LookalikeError, RasterError, SearchError
from ..core.index import TileIndex
from ..core.pipeline import (
    BuildParameters,
    BuildReport,
    Progress,
    Region,
    build_index,
    embed_query,
    index_encoder_path,
    indexed_source_for_geometry,
)
from ..core.query import changed_source_warnings
from ..core.raster import RasterSource, open_raster_quietly
from ..core.search import (
    DEFAULT_MAX_OVERLAP,
    Match,
    example_embeddings,
    negative_example_warnings,
    search,
)
from ..gis.raster_layers import (
    LayerSourceSpec,
    ProviderBlockReader,
    target_crs_wkt,
    write_provider_raster,
    written_raster_path,
)
from ..gis.tasks import LookalikeTask, TileProgress

LOGGER = get_logger("ui.jobs")

THUMBNAIL_READ_PX = 96


# -- build --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRequest:
    """A build as the dock asked for it; ``params.source_paths`` is empty for a provider source.

    For a provider source, ``provider_bounds`` (in ``provider_bounds_crs_wkt``) is the extent to
    read and ``gsd`` the ground sample distance to write it at.
    """

    params: BuildParameters
    source: LayerSourceSpec
    gsd: float
    provider_bounds: Optional[Tuple[float, float, float, float]] = None
    provider_bounds_crs_wkt: str = ""


def build_work(request: BuildRequest, task: LookalikeTask) -> BuildReport:
    """Build (or resume) the index; a provider source is first written to a GeoTIFF beside it."""
    params = request.params
    if not request.source.uses_gdal:
        raster_path = _write_provider_source(request, task)
        params = replace(params, source_paths=(str(raster_path),))

    def report(progress: Progress) -> None:
        task.report_progress(
            TileProgress(
                tiles_done=progress.tiles_done,
                tiles_total=progress.tiles_total,
                tiles_skipped=progress.tiles_skipped,
                rate_tiles_per_s=progress.rate_tiles_per_s,
                eta_s=progress.eta_s,
            )
        )

    return build_index(params, progress=report, is_cancelled=task.isCanceled)


def _write_provider_source(request: BuildRequest, task: LookalikeTask) -> Path:
    reader = ProviderBlockReader(request.source.provider, request.source.layer_name)
    if request.provider_bounds is None:
        raise LookalikeError(
            f"Layer {request.source.layer_name!r} is a tile or web service without a fixed extent; set "
            "the extent to the current map view or to polygons before building."
        )
    crs_wkt = target_crs_wkt(reader.crs, request.provider_bounds, request.provider_bounds_crs_wkt)
    polygon = Region(crs_wkt=request.provider_bounds_crs_wkt, bounds=request.provider_bounds).polygons_in(crs_wkt)[0]
    bounds = _envelope_of_wkt(polygon)
    path = written_raster_path(request.params.index_folder, request.source.provider_uri, bounds, crs_wkt, request.gsd)

    def report(blocks_done: int, blocks_total: int) -> None:
        # No tile count exists before the raster is written, so the task manager shows blocks
        # and the dock shows "Reading the layer" for a zero tile total.
        task.report_progress(TileProgress(tiles_done=0, tiles_total=0))
        task.setProgress(100.0 * blocks_done / max(blocks_total, 1))

    return write_provider_raster(reader, bounds, crs_wkt, request.gsd, path, report, task.isCanceled)


def _envelope_of_wkt(wkt: str) -> Tuple[float, float, float, float]:
    xmin, xmax, ymin, ymax = ogr.CreateGeometryFromWkt(wkt).GetEnvelope()
    return xmin, ymin, xmax, ymax


# -- search -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryPart:
    """A drawn query geometry as WKT in ``crs_wkt``; negative parts push matches away."""

    wkt: str
    crs_wkt: str
    negative: bool = False


@dataclass(frozen=True)
class SearchRequest:
    """A search: drawn parts, tiles the analyst marked, and how many matches to return."""

    index: TileIndex
    parts: Tuple[QueryPart, ...]
    k: int
    encoder: Optional[OnnxEncoder] = None
    # The panel's encoder, used when the file the index recorded is missing and this one fits.
    encoder_path: str = ""
    relevant_tile_ids: Tuple[int, ...] = ()
    not_relevant_tile_ids: Tuple[int, ...] = ()


@dataclass
class SearchOutcome:
    matches: List[Match]
    encoder: OnnxEncoder
    query_footprints: List[Tuple[Tuple[float, float, float, float], str]] = field(default_factory=list)
    positive_count: int = 0
    negative_count: int = 0
    warnings: List[str] = field(default_factory=list)


def encoder_path_for_index(index: TileIndex, fallback: str = "") -> str:
    """Return the encoder file to query ``index`` with; ``fallback`` is the panel's encoder.

    Raises:
        SearchIndexError: the recorded encoder file is missing and neither ``fallback`` nor the
            bundled model is the index's model.
    """
    return str(index_encoder_path(index, (fallback,)))


class QueryPartError(SearchError):
    """A search failed on one query part; ``position`` is its place in the request's parts."""

    def __init__(self, position: int, error: LookalikeError) -> None:
        super().__init__(str(error))
        self.position = position


def search_work(request: SearchRequest, task: LookalikeTask) -> SearchOutcome:
    """Embed the query parts, add the marked tiles' stored embeddings and search the index.

    Raises:
        QueryPartError: a part lies off the imagery or has a geometry that cannot be a query.
    """
    encoder = request.encoder or OnnxEncoder(encoder_path_for_index(request.index, request.encoder_path))
    request.index.check_encoder(encoder.name, encoder.checksum)
    positives: List[np.ndarray] = []
    negatives: List[np.ndarray] = []
    exclude: List[Tuple[Tuple[float, float, float, float], str]] = []
    # Each raster's existence is checked once, not once per query part.
    readable_paths: set = set()
    for position, part in enumerate(request.parts):
        task.check_cancelled()
        try:
            source_path = indexed_source_for_geometry(request.index, part.wkt, part.crs_wkt)
        except LookalikeError as error:
            raise QueryPartError(position, error) from error
        if source_path not in readable_paths and open_raster_quietly(source_path) is None:
            # The raster moved or went offline: the part is fine and stays for the next search.
            raise SearchError(
                f"The indexed raster {source_path} cannot be opened; move it back to that path, or build "
                "the index again from its new place."
            )
        readable_paths.add(source_path)
        try:
            chips = embed_query(request.index, encoder, source_path, part.wkt, part.crs_wkt,
                                is_cancelled=task.isCanceled)
        except CancelledError:
            raise
        except RasterError:
            # GDAL could not read the raster (damaged, replaced, offline): the part stays for the next search.
            raise
        except LookalikeError as error:
            raise QueryPartError(position, error) from error
        (negatives if part.negative else positives).append(chips.embeddings)
        if not part.negative:
            exclude.extend((tuple(bounds), crs) for bounds, crs in chips.excluded_footprints())

    stored = request.index.embeddings
    # Each marked tile is an example of its own, as each drawn part is (core.search.example_embeddings).
    positives.extend(np.asarray(stored[[tile_id]], dtype=np.float32) for tile_id in request.relevant_tile_ids)
    negatives.extend(np.asarray(stored[[tile_id]], dtype=np.float32) for tile_id in request.not_relevant_tile_ids)
    if not positives:
        raise SearchError(
            "The query has no positive example; draw at least one area that shows what to look for "
            "(negatives only push matches away)."
        )
    positive_chip_count = sum(len(chips) for chips in positives)
    negative_chip_count = sum(len(chips) for chips in negatives)
    positive_matrix = example_embeddings(positives)
    negative_matrix = example_embeddings(negatives) if negatives else None
    task.check_cancelled()
    matches = search(request.index, positive_matrix, negative_matrix, k=request.k, exclude=exclude)
    warnings = changed_source_warnings(request.index)
    if 0 < len(matches) < request.k:
        # The search widens until k matches survive, so fewer means no tile is left to try.
        warnings.append(
            f"The search found {len(matches)} of the {request.k} matches asked for: every other tile of the "
            f"index overlaps the query, or a better-ranked match by more than {DEFAULT_MAX_OVERLAP:.0%}, and such "
            "tiles are left out so that each match is a distinct place."
        )
    warnings.extend(negative_example_warnings(positive_matrix, negative_matrix))
    return SearchOutcome(
        matches=matches,
        encoder=encoder,
        query_footprints=exclude,
        positive_count=positive_chip_count,
        negative_count=negative_chip_count,
        warnings=warnings,
    )


# -- thumbnails ---------------------------------------------------------------------------------


def thumbnails_work(
    matches: Sequence[Match], sources: Sequence[Dict[str, Any]], task: LookalikeTask
) -> Dict[int, QImage]:
    """Read one RGB thumbnail per match from its raster, with the index's value stretch."""
    stretch_by_path = {record["path"]: record.get("value_stretch") for record in sources}
    band_indexes_by_path = {record["path"]: record.get("band_indexes") for record in sources}
    opened: Dict[str, RasterSource] = {}
    images: Dict[int, QImage] = {}
    try:
        for done, match in enumerate(matches):
            task.check_cancelled()
            path = match.source_path
            try:
                if path not in opened:
                    opened[path] = RasterSource(path, band_indexes_by_path.get(path))
                source = opened[path]
                stretch = stretch_by_path.get(path) or source.value_stretch(255.0)
                chip, valid = source.read_chip(match.bounds, match.crs_wkt, THUMBNAIL_READ_PX, stretch)
            except LookalikeError as error:
                LOGGER.warning("No thumbnail for tile %d of %s: %s", match.tile_id, path, error)
                continue
            images[int(match.tile_id)] = chip_to_image(chip, valid, float(stretch["value_scale"]))
            task.setProgress(100.0 * (done + 1) / len(matches))
    finally:
        for source in opened.values():
            source.close()
    return images


def chip_to_image(chip: np.ndarray, valid: np.ndarray, value_scale: float) -> QImage:
    """Convert a ``(bands, H, W)`` chip in ``[0, value_scale]`` to an RGB QImage; invalid pixels are grey."""
    bands = chip[:3] if chip.shape[0] >= 3 else np.repeat(chip[:1], 3, axis=0)
    rgb = np.clip(bands / value_scale * 255.0, 0, 255).astype(np.uint8)
    rgb[:, ~valid] = 128
    height, width = rgb.shape[1:]
    interleaved = np.ascontiguousarray(rgb.transpose(1, 2, 0))
    image = QImage(interleaved.data, width, height, 3 * width, QImage.Format.Format_RGB888)
    # QImage borrows the numpy buffer; copy() detaches it before the array goes away.
    return image.copy()
