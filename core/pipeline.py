"""The build pipeline (rasters to a tile index) and the query pipeline (geometries to embeddings).

Building streams tiles: a reader thread walks each source's tile grid lazily, reads chips with
GDAL and hands batches to the calling thread through a bounded queue, which encodes them with
onnxruntime while the next batch is read. GDAL and onnxruntime release the GIL, so the two
overlap. At most ``prefetch_batches + 1`` chip batches exist at any time (a semaphore bounds
them), so memory follows ``batch_size``, never the raster size.

Every finished batch is checkpointed as one chunk file in ``<index folder>.partial/``. A build
that was cancelled or crashed continues from the last chunk when it is run again with the same
parameters. A hash of the parameters, the encoder checksum, the source checksums and the grids
decides what "the same" means. The index itself is written by ``TileIndex`` at the end, and
the partial folder is removed after that.

Tile bookkeeping: every tile of the grids (restricted to the extent) is counted once in
``tiles_total``, and is either embedded or skipped for one reason (masked, mostly invalid,
blank), so ``tiles_embedded + tiles_skipped == tiles_total``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from osgeo import ogr, osr

from . import get_logger
from .encoder import OnnxEncoder, default_model_path
from .errors import CancelledError, GridError, LookalikeError, SearchError, SearchIndexError
from .grid import (
    Bounds,
    TileGrid,
    gsd_from_source_pixels,
    gsd_from_tile_ground_size,
    stride_from_overlap,
    validate_bounds,
)
from .index import MANIFEST_NAME, TileIndex, is_index_manifest, make_tile_table, read_manifest_json
from .lock import index_lock
from .raster import (
    DEFAULT_BLANK_STD_FRACTION,
    DEFAULT_MIN_VALID_FRACTION,
    SKIP_BLANK,
    SKIP_MOSTLY_INVALID,
    RasterSource,
    chip_skip_reason,
)
from .search import DEFAULT_MAX_OVERLAP, DEFAULT_STRATEGY, Match, search
from .spec import ModelSpec

LOGGER = get_logger("pipeline")

PathLike = Union[str, "os.PathLike[str]"]
Geometry = Union[Sequence[float], str]
ProgressCallback = Callable[["Progress"], None]
CancelCheck = Callable[[], bool]

SKIP_MASKED = "masked"
SKIP_REASONS = (SKIP_MASKED, SKIP_MOSTLY_INVALID, SKIP_BLANK)

# Tile size when neither the parameters nor the encoder spec give one: the input size of the
# common ImageNet encoders, so chips are read at the source's native resolution.
DEFAULT_TILE_SIZE_SOURCE_PX = 224.0

# An explicit tile must span at least this many source pixels. At 8 px a 224 px encoder already
# upsamples every source pixel to a 28 px block. Below that a chip is a few flat squares with no
# texture for the encoder to see, while the tile count grows with the square of the shrinkage.
MIN_TILE_SIZE_SOURCE_PX = 8.0

# A tile size taken from the encoder spec (a ground size) is raised to at least this many source
# pixels. The spec's ground size suits imagery near the encoder's training resolution; on coarser
# rasters (e.g. 112 m tiles on 3 km pixels) it would be sub-pixel. 32 px stays close to the
# intended scale while a chip still shows some structure.
MIN_DEFAULT_TILE_SIZE_SOURCE_PX = 32.0

# A plan is rejected when a source gets more tiles than its pixel count divided by this. At 16,
# 8 px tiles at 50 % overlap (4 px stride) are the densest grid allowed. Denser grids read the
# same pixels over and over without adding information.
MIN_SOURCE_PIXELS_PER_TILE = 16

# Absolute cap on the tiles of one build, lifted with BuildParameters.max_tile_count. Five million
# tiles take days on a CPU with the bundled encoder (an estimate) and about 10 GiB of float16
# embeddings at 1280 dims, so a larger plan is much more likely a mistake than an intent.
DEFAULT_MAX_TILE_COUNT = 5_000_000

PARTIAL_SUFFIX = ".partial"
PARTIAL_MARKER_NAME = "partial_build.json"
PARTIAL_FORMAT = "lookalike-partial-build"
CHUNK_PREFIX = "chunk_"
CHUNK_SUFFIX = ".npz"

# A batch is handed on after this many tiles even when few of them were embeddable, so that
# progress and cancellation keep coming through large nodata or masked areas.
MAX_TILES_PER_BATCH_FACTOR = 8

# The reader checks for a stop request this often while it waits for a free batch slot.
READER_POLL_INTERVAL_S = 0.1

# Raise when the marker or chunk layout changes, so checkpoints of an older layout are discarded.
PARTIAL_FORMAT_VERSION = 1


# -- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """An area given either as bounds or as polygons, in a stated CRS.

    Exactly one of ``bounds`` (``(xmin, ymin, xmax, ymax)``) and ``polygons_wkt`` (Polygon or
    MultiPolygon WKT strings) must be given. ``crs_wkt`` is any CRS that OSR reads (WKT,
    ``EPSG:xxxx``, PROJ string).
    """

    crs_wkt: str
    bounds: Optional[Bounds] = None
    polygons_wkt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.bounds is None) == (not self.polygons_wkt):
            raise GridError(
                "A region needs exactly one of bounds and polygons_wkt; pass bounds=(xmin, ymin, "
                "xmax, ymax) or polygons_wkt=('POLYGON ((...))',)."
            )
        if self.bounds is not None:
            object.__setattr__(self, "bounds", validate_bounds(self.bounds, "region bounds"))
        if isinstance(self.polygons_wkt, str):
            object.__setattr__(self, "polygons_wkt", (self.polygons_wkt,))
        else:
            object.__setattr__(self, "polygons_wkt", tuple(self.polygons_wkt))

    def polygons_in(self, target_crs_wkt: str) -> list[str]:
        """Return the region as polygon WKT strings transformed to ``target_crs_wkt``."""
        wkts = [_bounds_to_wkt(self.bounds)] if self.bounds is not None else list(self.polygons_wkt)
        return [transform_geometry_wkt(wkt, self.crs_wkt, target_crs_wkt) for wkt in wkts]

    def to_dict(self) -> dict[str, Any]:
        return {"crs_wkt": self.crs_wkt, "bounds": self.bounds, "polygons_wkt": list(self.polygons_wkt)}


@dataclass(frozen=True)
class BuildParameters:
    """Everything one index build needs; the dock, Processing and the CLI each fill one.

    Tile size: give ``tile_size_source_px`` (pixels of the first source raster) or
    ``tile_ground_size_m`` (in grid CRS units: metres for a metre-based projected CRS and for
    the UTM zone chosen for geographic rasters), not both. With neither, the encoder spec's
    ``tile_ground_size_m`` (or ``gsd_m * input_size_px``) is used when present, else
    ``DEFAULT_TILE_SIZE_SOURCE_PX``. Every source shares the resulting GSD, so tiles of several
    dates or strips are comparable. Tiles are read at the encoder's input size, so a tile of 48
    source pixels is upsampled to 224 encoder pixels for a 224 px encoder.

    Attributes:
        source_paths: rasters to index (files, VRTs or GDAL connection strings).
        index_folder: the index folder; it must be new, empty or an index.
        encoder_path: ONNX encoder; None selects the bundled model.
        tile_size_source_px: tile side in pixels of the first source.
        tile_ground_size_m: tile side in grid CRS units.
        overlap_fraction: overlap between neighbouring tiles in [0, 1); 0.5 halves the stride.
        extent: only tiles overlapping this region are indexed; None indexes whole rasters.
        mask: tiles more than ``1 - min_valid_fraction`` under these polygons are skipped.
        band_indexes: 1-based source bands, one per encoder band; None picks them from the
            colour interpretation.
        batch_size: chips per encoder run; also the checkpoint granularity.
        prefetch_batches: batches read ahead of the encoder; memory is about
            ``(prefetch_batches + 1) * batch_size`` chips.
        min_valid_fraction: tiles with a smaller fraction of valid (not nodata, inside the
            raster, not masked) pixels are skipped.
        hnsw_m: links per node of the HNSW graph (recall against memory).
        hnsw_ef_construction: candidate list size while inserting (graph quality against time).
        add_to_existing: add the sources to the index in ``index_folder`` instead of creating
            one; the grid's GSD and stride must match the index's.
        overwrite_existing_index: replace an index already in ``index_folder``. Only a folder
            whose ``manifest.json`` is a Lookalike manifest is an index; other folders are never
            written, with or without this flag.
        max_tile_count: the build is rejected before any work when its plan has more tiles.
    """

    source_paths: tuple[str, ...]
    index_folder: str
    encoder_path: Optional[str] = None
    tile_size_source_px: Optional[float] = None
    tile_ground_size_m: Optional[float] = None
    overlap_fraction: float = 0.0
    extent: Optional[Region] = None
    mask: Optional[Region] = None
    band_indexes: Optional[tuple[int, ...]] = None
    batch_size: int = 32
    prefetch_batches: int = 2
    min_valid_fraction: float = 0.5
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    add_to_existing: bool = False
    overwrite_existing_index: bool = False
    max_tile_count: int = DEFAULT_MAX_TILE_COUNT

    def __post_init__(self) -> None:
        paths = (self.source_paths,) if isinstance(self.source_paths, (str, os.PathLike)) else self.source_paths
        object.__setattr__(self, "source_paths", tuple(os.fspath(path) for path in paths))
        object.__setattr__(self, "index_folder", os.fspath(self.index_folder))
        if self.encoder_path is not None:
            object.__setattr__(self, "encoder_path", os.fspath(self.encoder_path))
        if self.band_indexes is not None:
            object.__setattr__(self, "band_indexes", tuple(self.band_indexes))
        self.validate()

    def validate(self) -> None:
        """Raise LookalikeError naming the first invalid parameter and its valid range."""
        if not self.source_paths:
            raise LookalikeError("source_paths is empty; pass at least one raster to index.")
        # realpath resolves "..", symbolic links and relative spellings of one file.
        real_paths = [os.path.realpath(path) if os.path.exists(path) else path for path in self.source_paths]
        if len(set(real_paths)) != len(real_paths):
            raise LookalikeError(
                f"source_paths {list(self.source_paths)} lists a raster twice (some paths resolve to "
                "the same file); pass each raster once."
            )
        if not self.index_folder:
            raise LookalikeError("index_folder is empty; pass the folder to write the index to.")
        if self.tile_size_source_px is not None and self.tile_ground_size_m is not None:
            raise LookalikeError(
                f"both tile_size_source_px={self.tile_size_source_px!r} and tile_ground_size_m="
                f"{self.tile_ground_size_m!r} were given; pass only one of them."
            )
        for name in ("tile_size_source_px", "tile_ground_size_m"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise LookalikeError(f"{name} {value!r} is invalid; pass a positive number.")
        if not (_is_number(self.overlap_fraction) and 0.0 <= self.overlap_fraction < 1.0):
            raise LookalikeError(
                f"overlap_fraction {self.overlap_fraction!r} is out of range; pass a value in [0, 1), "
                "e.g. 0.5 for half-overlapping tiles."
            )
        if not (_is_number(self.min_valid_fraction) and 0.0 < self.min_valid_fraction <= 1.0):
            raise LookalikeError(
                f"min_valid_fraction {self.min_valid_fraction!r} is out of range; pass a value in (0, 1]."
            )
        for name in ("batch_size", "prefetch_batches", "hnsw_m", "hnsw_ef_construction", "max_tile_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LookalikeError(f"{name} {value!r} is invalid; pass a positive integer.")
        if self.add_to_existing and self.overwrite_existing_index:
            raise LookalikeError(
                "add_to_existing and overwrite_existing_index are both set; choose one: add the "
                "sources to the index, or replace it."
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the parameters as a JSON-safe dict, as stored in the index manifest."""
        values = dataclasses.asdict(self)
        values["extent"] = self.extent.to_dict() if self.extent is not None else None
        values["mask"] = self.mask.to_dict() if self.mask is not None else None
        return values


@dataclass(frozen=True)
class Progress:
    """Build progress after a batch; ``tiles_done`` counts embedded and skipped tiles alike."""

    tiles_done: int
    tiles_total: int
    tiles_skipped: int
    rate_tiles_per_s: float
    eta_s: Optional[float]

    @property
    def fraction(self) -> float:
        """Share of tiles done in [0, 1]; 1 for a build with no tiles."""
        return self.tiles_done / self.tiles_total if self.tiles_total else 1.0


@dataclass
class BuildReport:
    """Outcome of :func:`build_index`.

    ``tiles_resumed`` tiles came from the checkpoints of an earlier, interrupted run, and
    ``rate_tiles_per_s`` counts only the tiles this run processed. ``peak_batches_in_memory`` is
    the largest number of chip batches that existed at once (read ahead, queued or encoding).
    """

    index_folder: str
    source_ids: list[int]
    grids: list[TileGrid]
    tiles_total: int
    tiles_embedded: int
    skipped_by_reason: dict[str, int]
    tiles_resumed: int
    elapsed_s: float
    rate_tiles_per_s: float
    peak_batches_in_memory: int
    encoder_name: str = ""
    already_complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # 1-based source bands fed to the encoder, one tuple per source in source_paths order.
    band_indexes: list[tuple[int, ...]] = field(default_factory=list)
    # Things the caller should show the user: a tile size other than the one requested, or a
    # source that contributed no tiles.
    warnings: list[str] = field(default_factory=list)

    @property
    def tiles_skipped(self) -> int:
        return sum(self.skipped_by_reason.values())


# -- geometry helpers ---------------------------------------------------------------------------


def _spatial_reference(crs: str) -> osr.SpatialReference:
    spatial_ref = osr.SpatialReference()
    # x is easting or longitude, the order of geotransforms and of every bounds tuple here.
    spatial_ref.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    try:
        status = spatial_ref.SetFromUserInput(crs)
    except RuntimeError as error:
        raise GridError(f"CRS {crs[:60]!r} is invalid ({error}); pass WKT or an EPSG code.") from error
    if status != 0:
        raise GridError(f"CRS {crs[:60]!r} is invalid; pass WKT or an EPSG code.")
    return spatial_ref


def _parse_geometry(wkt: str) -> ogr.Geometry:
    try:
        geometry = ogr.CreateGeometryFromWkt(wkt)
    except RuntimeError:
        geometry = None
    if geometry is None:
        shortened_wkt = wkt if len(wkt) <= 60 else wkt[:57] + "..."
        raise GridError(f"geometry {shortened_wkt!r} is not valid WKT; pass a POINT, POLYGON or MULTIPOLYGON.")
    return geometry


def transform_geometry_wkt(wkt: str, source_crs: str, target_crs: str) -> str:
    """Return ``wkt`` transformed from ``source_crs`` to ``target_crs`` (edges densified)."""
    source_ref = _spatial_reference(source_crs)
    target_ref = _spatial_reference(target_crs)
    geometry = _parse_geometry(wkt)
    if source_ref.IsSame(target_ref):
        return geometry.ExportToWkt()
    if ogr.GT_Flatten(geometry.GetGeometryType()) != ogr.wkbPoint:
        # Straight edges in one CRS are curves in another; 100 segments per edge follow them.
        envelope = geometry.GetEnvelope()
        longest_side = max(envelope[1] - envelope[0], envelope[3] - envelope[2])
        if longest_side > 0:
            geometry.Segmentize(longest_side / 100.0)
    transformation = osr.CoordinateTransformation(source_ref, target_ref)
    if geometry.Transform(transformation) != 0:
        raise GridError(
            f"the geometry cannot be transformed from {source_ref.GetName()} to {target_ref.GetName()}; "
            "check that it lies inside the area of use of both CRSs."
        )
    return geometry.ExportToWkt()


def _bounds_to_wkt(bounds: Bounds) -> str:
    xmin, ymin, xmax, ymax = bounds
    return (
        f"POLYGON (({xmin!r} {ymin!r}, {xmax!r} {ymin!r}, {xmax!r} {ymax!r}, "
        f"{xmin!r} {ymax!r}, {xmin!r} {ymin!r}))"
    )


def _geometry_to_wkt(geometry: Geometry) -> str:
    if isinstance(geometry, str):
        return geometry
    return _bounds_to_wkt(validate_bounds(geometry, "query bounds"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalised_path(path: str) -> str:
    """Return an absolute path for a local file, and GDAL connection strings unchanged."""
    return os.path.abspath(path) if os.path.exists(path) else path


# -- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SourcePlan:
    """One source of a build: its grid, value stretch, tile selection and manifest record."""

    position: int
    path: str
    band_indexes: tuple[int, ...]
    grid: TileGrid
    stretch: dict[str, Any]
    record: dict[str, Any]
    # Tile ids overlapping the extent polygons, or None to walk the whole grid lazily.
    selected_tiles: Optional[tuple[tuple[int, int], ...]]
    mask_polygons_wkt: tuple[str, ...]
    # The build's min_valid_fraction, scaled down for a raster smaller than one tile (see
    # _min_valid_fraction_for) so that its single tile is judged against the raster's own area.
    min_valid_fraction: float
    width_px: int
    height_px: int
    # Mean source pixel size in grid CRS units.
    pixel_size: float

    @property
    def tile_size_source_px(self) -> float:
        return self.grid.tile_ground_size / self.pixel_size

    @property
    def tile_count(self) -> int:
        return len(self.selected_tiles) if self.selected_tiles is not None else self.grid.tile_count


def _choose_gsd(
    params: BuildParameters, spec: ModelSpec, first_source: RasterSource, grid_crs_wkt: str
) -> tuple[float, Optional[str]]:
    """Return the GSD of a new grid, and a warning when the tile size differs from the requested one."""
    # NOTE: ground sizes are taken as grid CRS units, so for a projected CRS in feet the
    # "_m" sizes (parameter and spec) are read as feet.
    tile_size_px = spec.input_size_px
    pixel_size = _pixel_size_in(first_source, grid_crs_wkt)
    if params.tile_ground_size_m is not None:
        tile_size_source_px = params.tile_ground_size_m / pixel_size
        if tile_size_source_px < MIN_TILE_SIZE_SOURCE_PX:
            raise GridError(
                f"tile_ground_size_m {params.tile_ground_size_m:g} is only {tile_size_source_px:.3g} source "
                f"pixels of {first_source.path!r} ({pixel_size:.4g} CRS units per pixel); pass "
                f"tile_ground_size_m >= {MIN_TILE_SIZE_SOURCE_PX * pixel_size:.4g} "
                f"({MIN_TILE_SIZE_SOURCE_PX:g} source pixels)."
            )
        return gsd_from_tile_ground_size(params.tile_ground_size_m, tile_size_px), None
    if params.tile_size_source_px is not None:
        if params.tile_size_source_px < MIN_TILE_SIZE_SOURCE_PX:
            raise GridError(
                f"tile_size_source_px {params.tile_size_source_px:g} is below the minimum of "
                f"{MIN_TILE_SIZE_SOURCE_PX:g} source pixels, so a chip would hold no texture; pass "
                f"tile_size_source_px >= {MIN_TILE_SIZE_SOURCE_PX:g}, e.g. 64."
            )
        return gsd_from_source_pixels(params.tile_size_source_px, pixel_size, tile_size_px), None

    spec_ground_size = spec.tile_ground_size_m
    if spec_ground_size is None and spec.gsd_m is not None:
        spec_ground_size = float(spec.gsd_m) * tile_size_px
    if spec_ground_size is None:
        return gsd_from_source_pixels(DEFAULT_TILE_SIZE_SOURCE_PX, pixel_size, tile_size_px), None
    if spec_ground_size >= MIN_DEFAULT_TILE_SIZE_SOURCE_PX * pixel_size:
        return gsd_from_tile_ground_size(spec_ground_size, tile_size_px), None
    warning = (
        f"The encoder's suggested tile of {spec_ground_size:g} CRS units is only "
        f"{spec_ground_size / pixel_size:.3g} source pixels of {first_source.path!r} ({pixel_size:.4g} units "
        f"per pixel); using tiles of {MIN_DEFAULT_TILE_SIZE_SOURCE_PX:g} source pixels "
        f"({MIN_DEFAULT_TILE_SIZE_SOURCE_PX * pixel_size:.4g} units) instead. Pass tile_size_source_px or "
        "tile_ground_size_m to choose another size."
    )
    LOGGER.warning("%s", warning)
    return gsd_from_source_pixels(MIN_DEFAULT_TILE_SIZE_SOURCE_PX, pixel_size, tile_size_px), warning


def _pixel_size_in(source: RasterSource, crs_wkt: str) -> float:
    """Return the source's mean pixel size in ``crs_wkt`` units."""
    xmin, ymin, xmax, ymax = source.bounds_in(crs_wkt)
    return math.sqrt((xmax - xmin) / source.width * (ymax - ymin) / source.height)


def _plan_sources(
    params: BuildParameters, spec: ModelSpec, existing_grid: Optional[TileGrid], warnings: list[str]
) -> list[_SourcePlan]:
    """Open every source once to lay its grid and compute its value stretch.

    Warnings for the user (e.g. a tile size other than the encoder's) are appended to ``warnings``.
    """
    plans: list[_SourcePlan] = []
    gsd: Optional[float] = None
    stride_px = stride_from_overlap(spec.input_size_px, overlap_fraction=params.overlap_fraction)
    for position, path in enumerate(params.source_paths):
        source = RasterSource(path, params.band_indexes)
        try:
            if len(source.band_indexes) != spec.band_count:
                raise LookalikeError(
                    f"raster {path!r} gives {len(source.band_indexes)} bands {list(source.band_indexes)} but "
                    f"encoder {spec.name} takes {spec.band_count} ({', '.join(spec.bands)}); pass "
                    f"band_indexes with {spec.band_count} band numbers."
                )
            LOGGER.info("Source %s: encoder bands %s read from bands %s (%s)", path, list(spec.bands),
                        list(source.band_indexes), source.band_selection_reason)
            grid_crs_wkt = source.grid_crs_wkt()
            if gsd is None:
                gsd, warning = _resolve_gsd(params, spec, source, grid_crs_wkt, existing_grid)
                if warning is not None:
                    warnings.append(warning)
                if existing_grid is not None and existing_grid.stride_px != stride_px:
                    raise GridError(
                        f"overlap_fraction {params.overlap_fraction!r} gives a stride of {stride_px} px, but "
                        f"the index was built with a stride of {existing_grid.stride_px} of "
                        f"{existing_grid.tile_size_px} px; pass overlap_fraction="
                        f"{1 - existing_grid.stride_px / existing_grid.tile_size_px:g}."
                    )

            raster_bounds = source.bounds_in(grid_crs_wkt)
            extent_polygons = params.extent.polygons_in(grid_crs_wkt) if params.extent is not None else None
            grid_bounds = raster_bounds
            if extent_polygons is not None:
                grid_bounds = _clip_bounds(raster_bounds, extent_polygons, path)
            overlap_px = spec.input_size_px - stride_px
            grid = TileGrid.covering(grid_bounds, grid_crs_wkt, gsd, spec.input_size_px, overlap_px=overlap_px)
            selected = None
            if extent_polygons is not None:
                selected = tuple(grid.tiles_intersecting_polygons(extent_polygons))
            mask_polygons = tuple(params.mask.polygons_in(grid_crs_wkt)) if params.mask is not None else ()

            stretch = source.value_stretch(spec.value_scale)
            record = source.to_dict()
            record.update(path=_normalised_path(path), grid=grid.to_dict(), value_stretch=stretch)
            plans.append(
                _SourcePlan(
                    position=position,
                    path=path,
                    band_indexes=tuple(source.band_indexes),
                    grid=grid,
                    stretch=stretch,
                    record=record,
                    selected_tiles=selected,
                    mask_polygons_wkt=mask_polygons,
                    min_valid_fraction=_min_valid_fraction_for(params.min_valid_fraction, raster_bounds, grid),
                    width_px=source.width,
                    height_px=source.height,
                    pixel_size=_pixel_size_in(source, grid_crs_wkt),
                )
            )
            LOGGER.info(
                "Source %s: grid of %d x %d tiles of %.1f CRS units (gsd %.4g, stride %d px), %d to read",
                path, grid.n_rows, grid.n_cols, grid.tile_ground_size, grid.gsd, grid.stride_px,
                plans[-1].tile_count,
            )
            _check_tile_count(plans[-1])
        finally:
            source.close()
    _check_distinct_checksums(plans)
    tiles_total = sum(plan.tile_count for plan in plans)
    if tiles_total > params.max_tile_count:
        raise GridError(
            f"the build would read {tiles_total} tiles, more than max_tile_count {params.max_tile_count}; "
            "pass a larger tile size, a smaller overlap_fraction or an extent, or raise max_tile_count "
            "if that many tiles are intended."
        )
    return plans


def _min_valid_fraction_for(min_valid_fraction: float, raster_bounds: Bounds, grid: TileGrid) -> float:
    """Scale ``min_valid_fraction`` by the share of a tile that a raster smaller than one tile fills.

    Without this, a raster smaller than one tile could never be indexed: its only tile is mostly
    outside the raster. Rasters that span at least one tile along both axes keep the threshold.
    """
    tile = grid.tile_ground_size
    width_share = min(1.0, (raster_bounds[2] - raster_bounds[0]) / tile)
    height_share = min(1.0, (raster_bounds[3] - raster_bounds[1]) / tile)
    return min_valid_fraction * width_share * height_share


def _check_tile_count(plan: _SourcePlan) -> None:
    max_tiles = max(1, plan.width_px * plan.height_px // MIN_SOURCE_PIXELS_PER_TILE)
    if plan.tile_count > max_tiles:
        raise GridError(
            f"raster {plan.path!r} ({plan.width_px} x {plan.height_px} px) would give {plan.tile_count} tiles, "
            f"more than one per {MIN_SOURCE_PIXELS_PER_TILE} source pixels ({max_tiles}), so its tiles of "
            f"{plan.grid.tile_ground_size:.4g} CRS units at a stride of {plan.grid.stride_ground:.4g} read the "
            "same pixels many times; pass a larger tile size or a smaller overlap_fraction."
        )


def _check_distinct_checksums(plans: Sequence[_SourcePlan]) -> None:
    """Reject two sources with equal content, such as a raster and its copy under another path."""
    seen: dict[str, str] = {}
    for plan in plans:
        checksum = plan.record.get("checksum")
        if not checksum or not os.path.isfile(plan.path):
            continue
        if checksum in seen:
            raise LookalikeError(
                f"source_paths {seen[checksum]!r} and {plan.path!r} are the same raster (equal checksums); "
                "pass each raster once."
            )
        seen[checksum] = plan.path


def _resolve_gsd(
    params: BuildParameters,
    spec: ModelSpec,
    source: RasterSource,
    grid_crs_wkt: str,
    existing_grid: Optional[TileGrid],
) -> tuple[float, Optional[str]]:
    """Return the GSD of this build, and a warning when the tile size differs from the requested one."""
    tile_size_given = params.tile_size_source_px is not None or params.tile_ground_size_m is not None
    if existing_grid is None:
        return _choose_gsd(params, spec, source, grid_crs_wkt)
    if existing_grid.tile_size_px != spec.input_size_px:
        raise SearchIndexError(
            f"the index grid reads {existing_grid.tile_size_px} px chips but encoder {spec.name} takes "
            f"{spec.input_size_px} px; add the sources with the index's encoder."
        )
    if not tile_size_given:
        return existing_grid.gsd, None
    gsd, _ = _choose_gsd(params, spec, source, grid_crs_wkt)
    if not math.isclose(gsd, existing_grid.gsd, rel_tol=1e-6):
        raise GridError(
            f"the tile size gives a GSD of {gsd:.6g} but the index was built at {existing_grid.gsd:.6g} "
            f"(tiles of {existing_grid.tile_ground_size:.6g} CRS units); leave the tile size unset to "
            "use the index's, or pass tile_ground_size_m="
            f"{existing_grid.tile_ground_size:.6g}."
        )
    return gsd, None


def _clip_bounds(raster_bounds: Bounds, polygons_wkt: Sequence[str], path: str) -> Bounds:
    """Return the part of ``raster_bounds`` under the envelope of the extent polygons."""
    envelopes = [_parse_geometry(wkt).GetEnvelope() for wkt in polygons_wkt]
    xmin = max(raster_bounds[0], min(envelope[0] for envelope in envelopes))
    xmax = min(raster_bounds[2], max(envelope[1] for envelope in envelopes))
    ymin = max(raster_bounds[1], min(envelope[2] for envelope in envelopes))
    ymax = min(raster_bounds[3], max(envelope[3] for envelope in envelopes))
    if not (xmin < xmax and ymin < ymax):
        raise GridError(
            f"the extent does not overlap raster {path!r} (raster bounds {tuple(raster_bounds)} in its "
            "grid CRS); choose an extent over the raster or leave it unset."
        )
    return xmin, ymin, xmax, ymax


def _build_id(params: BuildParameters, encoder: OnnxEncoder, plans: Sequence[_SourcePlan]) -> str:
    """Hash everything that decides which tiles get which embeddings.

    ``batch_size`` and ``prefetch_batches`` are left out: chunks are keyed by tile position, so
    a build can resume with another batch size. The HNSW parameters are left out because the
    chunks contain embeddings only.
    """
    content = {
        "format_version": PARTIAL_FORMAT_VERSION,
        "encoder_checksum": encoder.checksum,
        "sources": [
            {
                "path": plan.record["path"],
                "checksum": plan.record["checksum"],
                "band_indexes": list(plan.band_indexes),
                "grid": plan.grid.to_dict(),
                "stretch": plan.stretch,
                "selected_tiles": None if plan.selected_tiles is None else len(plan.selected_tiles),
                "mask": list(plan.mask_polygons_wkt),
            }
            for plan in plans
        ],
        "extent": params.extent.to_dict() if params.extent is not None else None,
        "min_valid_fraction": params.min_valid_fraction,
        "blank_std_fraction": DEFAULT_BLANK_STD_FRACTION,
        "add_to_existing": params.add_to_existing,
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- tile walking and reading -------------------------------------------------------------------


def _iter_source_tiles(plan: _SourcePlan, max_masked_fraction: float) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(row, col, masked)`` for every tile of a source, in row-major order."""

    def candidates() -> Iterator[tuple[int, int]]:
        return iter(plan.selected_tiles) if plan.selected_tiles is not None else plan.grid.tile_ids()

    if not plan.mask_polygons_wkt:
        for row, col in candidates():
            yield row, col, False
        return

    # tiles_outside_mask yields the unmasked tiles in the order given, so walking it in step
    # with the candidates marks the ones it dropped without testing any tile twice.
    unmasked_tiles = plan.grid.tiles_outside_mask(candidates(), plan.mask_polygons_wkt, max_masked_fraction)
    next_unmasked = next(unmasked_tiles, None)
    for tile_id in candidates():
        if tile_id == next_unmasked:
            yield tile_id[0], tile_id[1], False
            next_unmasked = next(unmasked_tiles, None)
        else:
            yield tile_id[0], tile_id[1], True


class _Batch:
    """Chips of consecutive tile positions ``[start_position, end_position)`` and their skips."""

    def __init__(self, start_position: int, capacity: int, chip_shape: tuple[int, int, int], n_sources: int) -> None:
        self.start_position = start_position
        self.end_position = start_position
        self.chips = np.empty((capacity, *chip_shape), dtype=np.float32)
        self.source_positions = np.empty(capacity, dtype=np.int32)
        self.rows = np.empty(capacity, dtype=np.int32)
        self.cols = np.empty(capacity, dtype=np.int32)
        self.count = 0
        self.skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)

    @property
    def tile_count(self) -> int:
        return self.end_position - self.start_position

    @property
    def is_full(self) -> bool:
        return self.count == len(self.chips)


@dataclass
class _ReaderFailure:
    error: BaseException


_END_OF_TILES = object()


class _BatchSlots:
    """A counting semaphore over chip batches that also records the peak number in use."""

    def __init__(self, slot_count: int) -> None:
        self._semaphore = threading.Semaphore(slot_count)
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0

    def acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self._semaphore.acquire(timeout=READER_POLL_INTERVAL_S):
                with self._lock:
                    self.in_use += 1
                    self.peak = max(self.peak, self.in_use)
                return True
        return False

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1
        self._semaphore.release()


class _TileReader(threading.Thread):
    """Reads chips for tile positions from ``start_position`` on and queues them as batches.

    The thread opens its own ``RasterSource`` objects, because GDAL datasets must not be shared
    between threads. Errors are passed to the consumer through the queue and raised there.
    """

    def __init__(
        self,
        plans: Sequence[_SourcePlan],
        spec: ModelSpec,
        params: BuildParameters,
        start_position: int,
        slots: _BatchSlots,
    ) -> None:
        super().__init__(name="lookalike-tile-reader", daemon=True)
        self._plans = plans
        self._spec = spec
        self._params = params
        self._start_position = start_position
        self._slots = slots
        self.batches: queue.Queue[Any] = queue.Queue(maxsize=params.prefetch_batches)
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            self._read_all()
        except Exception as error:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            self._put(_ReaderFailure(error))

    def stop(self) -> None:
        self.stop_event.set()
        # Unblock a reader waiting on a full queue; what it put there is discarded.
        while True:
            try:
                self.batches.get_nowait()
            except queue.Empty:
                break
        self.join()

    def _put(self, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.batches.put(item, timeout=READER_POLL_INTERVAL_S)
                return True
            except queue.Full:
                continue
        return False

    def _new_batch(self, start_position: int) -> Optional[_Batch]:
        if not self._slots.acquire(self.stop_event):
            return None
        size_px = self._spec.input_size_px
        return _Batch(start_position, self._params.batch_size, (self._spec.band_count, size_px, size_px),
                      len(self._plans))

    def _read_all(self) -> None:
        max_tiles_per_batch = self._params.batch_size * MAX_TILES_PER_BATCH_FACTOR
        max_masked_fraction = 1.0 - self._params.min_valid_fraction
        position = 0
        batch: Optional[_Batch] = None
        for plan in self._plans:
            if position + plan.tile_count <= self._start_position:
                position += plan.tile_count
                continue
            source = RasterSource(plan.path, plan.band_indexes)
            try:
                for row, col, masked in _iter_source_tiles(plan, max_masked_fraction):
                    if position < self._start_position:
                        position += 1
                        continue
                    if batch is None:
                        batch = self._new_batch(position)
                        if batch is None:
                            return
                    self._read_tile(source, plan, row, col, masked, batch)
                    position += 1
                    batch.end_position = position
                    if batch.is_full or batch.tile_count >= max_tiles_per_batch:
                        if not self._put(batch):
                            return
                        batch = None
            finally:
                source.close()
        if batch is not None and not self._put(batch):
            return
        self._put(_END_OF_TILES)

    def _read_tile(
        self, source: RasterSource, plan: _SourcePlan, row: int, col: int, masked: bool, batch: _Batch
    ) -> None:
        if masked:
            batch.skipped[plan.position, SKIP_REASONS.index(SKIP_MASKED)] += 1
            return
        chip, valid = source.read_chip(
            plan.grid.tile_bounds(row, col), plan.grid.crs_wkt, plan.grid.tile_size_px, plan.stretch
        )
        reason = chip_skip_reason(chip, valid, self._spec.value_scale, plan.min_valid_fraction)
        if reason is not None:
            batch.skipped[plan.position, SKIP_REASONS.index(reason)] += 1
            return
        slot = batch.count
        batch.chips[slot] = chip
        batch.source_positions[slot] = plan.position
        batch.rows[slot] = row
        batch.cols[slot] = col
        batch.count += 1


# -- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    start_position: int
    end_position: int
    source_positions: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    embeddings: np.ndarray
    skipped: np.ndarray


class _PartialBuild:
    """The ``<index>.partial/`` folder: a marker with the build id and one chunk per batch."""

    def __init__(self, folder: Path, build_id: str) -> None:
        self.folder = folder
        self.build_id = build_id

    @classmethod
    def open_or_create(cls, folder: Path, build_id: str) -> _PartialBuild:
        """Reuse a checkpoint folder of the same build, or start a new one.

        A checkpoint folder of a different build (other parameters, sources or encoder) is
        removed. A folder at that path without the marker file is not ours and is never touched.
        """
        marker = folder / PARTIAL_MARKER_NAME
        if folder.exists():
            stored_id = _read_partial_marker(marker)
            if stored_id is None:
                raise SearchIndexError(
                    f"{folder} exists but is not a Lookalike checkpoint folder ({PARTIAL_MARKER_NAME} is "
                    "missing); move it away or choose another index folder."
                )
            if stored_id == build_id:
                return cls(folder, build_id)
            LOGGER.warning("Discarding the checkpoints in %s: they belong to a build with other parameters, "
                           "sources or encoder, so their tiles are read again", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_atomically(
            marker,
            json.dumps({"format": PARTIAL_FORMAT, "format_version": PARTIAL_FORMAT_VERSION,
                        "build_id": build_id}).encode("utf-8"),
        )
        return cls(folder, build_id)

    def chunk_paths(self) -> list[Path]:
        return sorted(self.folder.glob(f"{CHUNK_PREFIX}*{CHUNK_SUFFIX}"))

    def load_chunks(self) -> Iterator[_Chunk]:
        """Yield the chunks in tile order; stops at a gap, so only a contiguous prefix counts."""
        expected_start = 0
        for path in self.chunk_paths():
            chunk = _read_chunk(path)
            if chunk is None or chunk.start_position != expected_start:
                LOGGER.warning("Ignoring checkpoint %s and those after it: it does not continue at tile %d",
                               path, expected_start)
                return
            yield chunk
            expected_start = chunk.end_position

    def resume_state(self, n_sources: int) -> tuple[int, int, np.ndarray]:
        """Return the next tile position, the tiles embedded so far and the skip counts so far."""
        position = 0
        embedded = 0
        skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)
        for chunk in self.load_chunks():
            position = chunk.end_position
            embedded += len(chunk.rows)
            skipped += chunk.skipped
        return position, embedded, skipped

    def write_chunk(self, batch: _Batch, embeddings: np.ndarray) -> None:
        count = batch.count
        path = self.folder / f"{CHUNK_PREFIX}{batch.start_position:012d}{CHUNK_SUFFIX}"
        temp_path = path.with_name(path.name + ".tmp")
        with open(temp_path, "wb") as stream:
            np.savez(
                stream,
                positions=np.array([batch.start_position, batch.end_position], dtype=np.int64),
                source_positions=batch.source_positions[:count],
                rows=batch.rows[:count],
                cols=batch.cols[:count],
                embeddings=embeddings.astype(np.float32, copy=False),
                skipped=batch.skipped,
            )
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=False)


def _read_partial_marker(marker: Path) -> Optional[str]:
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != PARTIAL_FORMAT:
        return None
    return str(content.get("build_id", ""))


def _read_chunk(path: Path) -> Optional[_Chunk]:
    try:
        with np.load(path, allow_pickle=False) as data:
            start, end = (int(value) for value in data["positions"])
            return _Chunk(
                start_position=start,
                end_position=end,
                source_positions=data["source_positions"],
                rows=data["rows"],
                cols=data["cols"],
                embeddings=data["embeddings"],
                skipped=data["skipped"],
            )
    except (OSError, ValueError, KeyError) as error:
        LOGGER.warning("Checkpoint %s cannot be read (%s); its tiles are read again", path, error)
        return None


def _write_atomically(path: Path, content: bytes) -> None:
    temp_path = path.with_name(path.name + ".tmp")
    with open(temp_path, "wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp_path, path)


# -- building -----------------------------------------------------------------------------------


def partial_folder_for(index_folder: PathLike) -> Path:
    """Return the checkpoint folder of a build into ``index_folder``: ``<index_folder>.partial``."""
    folder = Path(index_folder)
    return folder.with_name(folder.name + PARTIAL_SUFFIX)


def _encoder_info(encoder: OnnxEncoder) -> dict[str, Any]:
    spec = dataclasses.asdict(encoder.spec)
    return {
        "name": encoder.name,
        "checksum": encoder.checksum,
        "embedding_dim": encoder.spec.embedding_dim,
        "spec": json.loads(json.dumps(spec)),
    }


def _check_index_folder(params: BuildParameters) -> Optional[TileIndex]:
    """Check ``index_folder`` before any work; return the open index when adding to it."""
    folder = Path(params.index_folder)
    if folder.exists() and not folder.is_dir():
        raise SearchIndexError(f"index folder {folder} is a file; choose a folder path for the index.")
    manifest_path = folder / MANIFEST_NAME
    has_index = manifest_path.is_file() and is_index_manifest(manifest_path)
    if manifest_path.is_file() and not has_index:
        # Another program's manifest.json: the folder is the user's and is never written to.
        raise SearchIndexError(
            f"folder {folder} is not a Lookalike index: its {MANIFEST_NAME} is not a Lookalike manifest "
            "(no \"format\": \"lookalike-index\"); choose a new or empty folder for the index."
        )
    if folder.is_dir() and any(folder.iterdir()) and not has_index:
        raise SearchIndexError(
            f"folder {folder} is not empty and contains no Lookalike index ({MANIFEST_NAME} is missing); "
            "choose a new or empty folder for the index."
        )
    if params.add_to_existing:
        if not has_index:
            raise SearchIndexError(
                f"add_to_existing is set but {folder} contains no index; build a new index there first "
                "or clear add_to_existing."
            )
        return TileIndex.open(folder)
    return None


def build_index(
    params: BuildParameters,
    progress: Optional[ProgressCallback] = None,
    is_cancelled: Optional[CancelCheck] = None,
) -> BuildReport:
    """Embed every tile of the sources and write (or extend) the index in ``params.index_folder``.

    ``progress`` is called from this thread after every batch. ``is_cancelled`` is polled before
    every batch; when it returns True the build stops, keeps its checkpoints and raises
    CancelledError. Running the same parameters again resumes from the checkpoints.

    Raises:
        CancelledError: ``is_cancelled`` returned True.
        IndexLockedError: another build or save holds ``<index folder>.lock``.
        LookalikeError: invalid parameters, an unreadable raster or encoder, an index folder that
            must not be written, sources already in the index, a tile size below
            ``MIN_TILE_SIZE_SOURCE_PX`` source pixels, a plan with more tiles than the rasters'
            pixels justify or than ``max_tile_count``, or a build in which no tile was embedded
            (then nothing is written and the checkpoints are removed).
    """
    # The lock covers the folder checks too, so two builds cannot both find the folder free.
    with index_lock(params.index_folder):
        return _build_index_locked(params, progress, is_cancelled)


def _build_index_locked(
    params: BuildParameters,
    progress: Optional[ProgressCallback],
    is_cancelled: Optional[CancelCheck],
) -> BuildReport:
    started_at = time.monotonic()
    encoder = OnnxEncoder(params.encoder_path or default_model_path(), batch_size=params.batch_size)
    existing_index = _check_index_folder(params)
    if existing_index is not None:
        existing_index.check_encoder(encoder.name, encoder.checksum)
    existing_grid = _first_grid(existing_index)
    warnings: list[str] = []
    plans = _plan_sources(params, encoder.spec, existing_grid, warnings)
    build_id = _build_id(params, encoder, plans)
    partial_folder = partial_folder_for(params.index_folder)

    finished = _finished_report(params, plans, build_id, partial_folder, encoder, started_at)
    if finished is not None:
        finished.warnings = warnings
        return finished
    if existing_index is not None:
        _check_not_indexed_yet(existing_index, plans)
    elif (
        (Path(params.index_folder) / MANIFEST_NAME).is_file()
        and not params.overwrite_existing_index
        and not _is_own_unfinished_index(Path(params.index_folder), build_id)
    ):
        raise SearchIndexError(
            f"{params.index_folder} already contains an index; set add_to_existing to add these rasters "
            "to it, overwrite_existing_index to replace it, or choose another folder."
        )

    partial = _PartialBuild.open_or_create(partial_folder, build_id)
    tiles_total = sum(plan.tile_count for plan in plans)
    start_position, embedded, skipped = partial.resume_state(len(plans))
    if start_position:
        LOGGER.info("Resuming the build of %s at tile %d of %d from %s", params.index_folder,
                    start_position, tiles_total, partial.folder)

    peak_batches = _embed_tiles(
        plans, encoder, params, partial, start_position, embedded, skipped, tiles_total, progress, is_cancelled
    )
    embedded_by_source, skipped = _counts_from_checkpoints(partial, len(plans))
    if not embedded_by_source.any():
        # Nothing is committed: an empty index would look like a valid one to a later search.
        partial.remove()
        raise LookalikeError(_nothing_embedded_message(params, plans, skipped))
    warnings.extend(_empty_source_warnings(plans, embedded_by_source, skipped))
    source_ids = _commit(params, encoder, plans, partial, build_id, existing_index)
    partial.remove()

    _, embedded, skipped = _totals_from_index(params.index_folder, build_id, len(plans))
    elapsed_s = time.monotonic() - started_at
    processed = tiles_total - start_position
    report = BuildReport(
        index_folder=params.index_folder,
        source_ids=source_ids,
        grids=[plan.grid for plan in plans],
        tiles_total=tiles_total,
        tiles_embedded=embedded,
        skipped_by_reason=_skips_by_reason(skipped),
        tiles_resumed=start_position,
        elapsed_s=elapsed_s,
        rate_tiles_per_s=processed / elapsed_s if elapsed_s > 0 else 0.0,
        peak_batches_in_memory=peak_batches,
        encoder_name=encoder.name,
        band_indexes=[plan.band_indexes for plan in plans],
        warnings=warnings,
    )
    LOGGER.info(
        "Built %s: %d tiles embedded, %d skipped %s, in %.1f s (%.1f tiles/s)",
        params.index_folder, report.tiles_embedded, report.tiles_skipped, report.skipped_by_reason,
        elapsed_s, report.rate_tiles_per_s,
    )
    return report


def _counts_from_checkpoints(partial: _PartialBuild, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the embedded tiles per source and the skip counts ``(source, reason)`` of all chunks."""
    embedded = np.zeros(n_sources, dtype=np.int64)
    skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)
    for chunk in partial.load_chunks():
        embedded += np.bincount(chunk.source_positions, minlength=n_sources)[:n_sources]
        skipped += chunk.skipped
    return embedded, skipped


def _describe_skips(counts: np.ndarray) -> str:
    return ", ".join(f"{int(count)} {reason}" for reason, count in zip(SKIP_REASONS, counts) if count)


def _skip_advice(params: BuildParameters, plan: _SourcePlan, counts: np.ndarray) -> str:
    """Return why every tile of ``plan`` was skipped and what to change, from the main skip reason."""
    dominant = SKIP_REASONS[int(np.argmax(counts))]
    if dominant == SKIP_MASKED:
        return "the mask covers every tile; shrink the mask or leave it unset"
    if dominant == SKIP_BLANK:
        return "every tile is uniform (a fill value or cloud); check the band selection and the nodata value"
    if plan.tile_size_source_px > max(plan.width_px, plan.height_px):
        return (
            f"tile size {plan.tile_size_source_px:.4g} source px is larger than the raster "
            f"({plan.width_px}x{plan.height_px} px); pass tile_size_source_px <= "
            f"{min(plan.width_px, plan.height_px)}"
        )
    return (
        f"too few valid pixels per tile; lower min_valid_fraction (now {params.min_valid_fraction:g}), pass a "
        "smaller tile size, or check that the raster's nodata value does not mark image pixels"
    )


def _nothing_embedded_message(params: BuildParameters, plans: Sequence[_SourcePlan], skipped: np.ndarray) -> str:
    totals = skipped.sum(axis=0)
    parts = [
        f"0 tiles embedded into {params.index_folder} (skipped: {_describe_skips(totals) or 'none'}), so no "
        "index was written."
    ]
    for plan in plans:
        counts = skipped[plan.position]
        parts.append(
            f"Raster {plan.path!r}: {_describe_skips(counts) or 'no tiles'}; {_skip_advice(params, plan, counts)}."
        )
    return " ".join(parts)


def _empty_source_warnings(
    plans: Sequence[_SourcePlan], embedded_by_source: np.ndarray, skipped: np.ndarray
) -> list[str]:
    warnings = []
    for plan in plans:
        if embedded_by_source[plan.position]:
            continue
        warning = (
            f"Raster {plan.path!r} contributed 0 tiles ({_describe_skips(skipped[plan.position]) or 'no tiles'}); "
            "search will never return it. Check its nodata value, the extent and the mask."
        )
        LOGGER.warning("%s", warning)
        warnings.append(warning)
    return warnings


def _first_grid(index: Optional[TileIndex]) -> Optional[TileGrid]:
    if index is None or not index.sources:
        return None
    return TileGrid.from_dict(index.sources[0]["grid"])


def _check_not_indexed_yet(index: TileIndex, plans: Sequence[_SourcePlan]) -> None:
    for plan in plans:
        for record in index.sources:
            if record.get("checksum") == plan.record["checksum"] and record.get("grid") == plan.grid.to_dict():
                raise SearchIndexError(
                    f"raster {plan.path!r} is already in index {index.folder} with the same grid (source "
                    f"{record['id']}); remove it from source_paths."
                )


def _finished_report(
    params: BuildParameters,
    plans: Sequence[_SourcePlan],
    build_id: str,
    partial_folder: Path,
    encoder: OnnxEncoder,
    started_at: float,
) -> Optional[BuildReport]:
    """Return a report when an earlier run of this build committed the index but did not clean up."""
    if not partial_folder.exists() or not (Path(params.index_folder) / MANIFEST_NAME).is_file():
        return None
    source_ids, embedded, skipped = _totals_from_index(params.index_folder, build_id, len(plans))
    if not source_ids:
        return None
    LOGGER.info("The build of %s was already committed; removing its checkpoints %s",
                params.index_folder, partial_folder)
    if _read_partial_marker(partial_folder / PARTIAL_MARKER_NAME) == build_id:
        shutil.rmtree(partial_folder)
    tiles_total = sum(plan.tile_count for plan in plans)
    return BuildReport(
        index_folder=params.index_folder,
        source_ids=source_ids,
        grids=[plan.grid for plan in plans],
        tiles_total=tiles_total,
        tiles_embedded=embedded,
        skipped_by_reason=_skips_by_reason(skipped),
        tiles_resumed=tiles_total,
        elapsed_s=time.monotonic() - started_at,
        rate_tiles_per_s=0.0,
        peak_batches_in_memory=0,
        encoder_name=encoder.name,
        already_complete=True,
    )


def _totals_from_index(index_folder: str, build_id: str, n_sources: int) -> tuple[list[int], int, np.ndarray]:
    index = TileIndex.open(index_folder)
    records = [record for record in index.sources if record.get("build_id") == build_id]
    skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)
    embedded = 0
    for position, record in enumerate(records[:n_sources]):
        embedded += int(record.get("tile_count", 0))
        counts = record.get("skipped_counts", {})
        skipped[position] = [int(counts.get(reason, 0)) for reason in SKIP_REASONS]
    return [int(record["id"]) for record in records], embedded, skipped


def _skips_by_reason(skipped: np.ndarray) -> dict[str, int]:
    totals = skipped.sum(axis=0) if skipped.size else np.zeros(len(SKIP_REASONS), dtype=np.int64)
    return {reason: int(count) for reason, count in zip(SKIP_REASONS, totals)}


def _embed_tiles(
    plans: Sequence[_SourcePlan],
    encoder: OnnxEncoder,
    params: BuildParameters,
    partial: _PartialBuild,
    start_position: int,
    embedded: int,
    skipped: np.ndarray,
    tiles_total: int,
    progress: Optional[ProgressCallback],
    is_cancelled: Optional[CancelCheck],
) -> int:
    """Encode and checkpoint every tile from ``start_position`` on; return the peak batch count."""
    if start_position >= tiles_total:
        return 0
    # One batch more than the queue holds: the one the encoder is working on.
    slots = _BatchSlots(params.prefetch_batches + 1)
    reader = _TileReader(plans, encoder.spec, params, start_position, slots)
    run_started_at = time.monotonic()
    position = start_position
    skipped_total = int(skipped.sum())
    reader.start()
    try:
        while True:
            if is_cancelled is not None and is_cancelled():
                raise CancelledError(
                    f"The build of {params.index_folder} was cancelled after {position} of {tiles_total} "
                    f"tiles; run it again with the same parameters to continue from {partial.folder}."
                )
            item = _next_batch(reader)
            if item is _END_OF_TILES:
                break
            if isinstance(item, _ReaderFailure):
                raise item.error
            batch: _Batch = item
            del item
            try:
                if batch.count:
                    embeddings = encoder.encode(batch.chips[: batch.count])
                else:
                    embeddings = np.empty((0, encoder.spec.embedding_dim), dtype=np.float32)
                partial.write_chunk(batch, embeddings)
                position = batch.end_position
                embedded += batch.count
                skipped_total += int(batch.skipped.sum())
            finally:
                # The chips are dropped before the slot is freed, so the reader's next batch
                # never exists alongside this one beyond the bound.
                del batch
                slots.release()
            if progress is not None:
                progress(_progress(position, tiles_total, skipped_total, start_position, run_started_at))
    finally:
        reader.stop()
    return slots.peak


def _next_batch(reader: _TileReader) -> Any:
    while True:
        try:
            return reader.batches.get(timeout=READER_POLL_INTERVAL_S)
        except queue.Empty:
            # The reader always queues an end marker or its error; a thread killed without
            # either (e.g. by SystemExit) would otherwise block this loop for ever.
            if not reader.is_alive() and reader.batches.empty():
                raise LookalikeError(
                    "The tile reader thread stopped without finishing or reporting an error; run the "
                    "build again to continue from its checkpoints."
                ) from None


def _progress(position: int, tiles_total: int, skipped_total: int, start_position: int,
              run_started_at: float) -> Progress:
    elapsed_s = time.monotonic() - run_started_at
    processed = position - start_position
    rate = processed / elapsed_s if elapsed_s > 0 else 0.0
    eta_s = (tiles_total - position) / rate if rate > 0 else None
    return Progress(
        tiles_done=position,
        tiles_total=tiles_total,
        tiles_skipped=skipped_total,
        rate_tiles_per_s=rate,
        eta_s=eta_s,
    )


def _commit(
    params: BuildParameters,
    encoder: OnnxEncoder,
    plans: Sequence[_SourcePlan],
    partial: _PartialBuild,
    build_id: str,
    existing_index: Optional[TileIndex],
) -> list[int]:
    """Write the checkpointed embeddings into the index folder; return the new source ids."""
    if existing_index is not None:
        index = existing_index
    else:
        # Replacing is allowed when the user asked for it, or when the index there is an
        # unfinished commit of this very build (created, then interrupted before its tiles).
        folder = Path(params.index_folder)
        replace = params.overwrite_existing_index or _is_own_unfinished_index(folder, build_id)
        index = TileIndex.create(
            folder,
            _encoder_info(encoder),
            m=params.hnsw_m,
            ef_construction=params.hnsw_ef_construction,
            build_parameters={**params.to_dict(), "build_id": build_id},
            overwrite=replace,
        )

    source_ids = []
    skipped = np.zeros((len(plans), len(SKIP_REASONS)), dtype=np.int64)
    for plan in plans:
        source_ids.append(index.add_source({**plan.record, "build_id": build_id}))
    for chunk in partial.load_chunks():
        skipped += chunk.skipped
        if len(chunk.rows) == 0:
            continue
        table_source_ids = np.asarray(source_ids, dtype=np.int32)[chunk.source_positions]
        tiles = make_tile_table(0, chunk.rows, chunk.cols)
        tiles["source_id"] = table_source_ids
        index.add(chunk.embeddings, tiles)
    for plan, source_id in zip(plans, source_ids):
        counts = {reason: int(count) for reason, count in zip(SKIP_REASONS, skipped[plan.position])}
        index.update_source(source_id, {"skipped_counts": counts})
    index.save()
    return source_ids


def _is_own_unfinished_index(folder: Path, build_id: str) -> bool:
    manifest = read_manifest_json(folder / MANIFEST_NAME)
    if manifest is None or not is_index_manifest(folder / MANIFEST_NAME):
        return False
    build_parameters = manifest.get("build_parameters")
    return isinstance(build_parameters, dict) and build_parameters.get("build_id") == build_id


# -- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryChips:
    """Embeddings of query chips and where each chip was read, in the query raster's grid CRS."""

    embeddings: np.ndarray
    footprints: list[Bounds]
    crs_wkt: str

    def __iter__(self) -> Iterator[Any]:
        # Unpacks as (embeddings, footprints), the two values most callers need.
        return iter((self.embeddings, self.footprints))


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
) -> QueryChips:
    """Read and embed the query chips for one geometry, at the index's GSD and tile size.

    ``geometry`` is ``(xmin, ymin, xmax, ymax)`` or WKT (POINT, POLYGON, MULTIPOLYGON) in
    ``crs_wkt``. A point gives the tile centred on it. A region that fits in one tile gives one
    chip centred on the region. A larger region gives the tiles (without overlap) that cover it,
    each a separate query chip. Chips that are mostly nodata are dropped.

    The raster may be an indexed source or any other raster. Indexed sources are read with the
    stretch stored in the index, so query and tiles see the same values.

    Raises:
        SearchIndexError: the index is empty or was built with another encoder.
        SearchError: every chip of the geometry is nodata.
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
        footprints = _query_footprints(_geometry_to_wkt(geometry), crs_wkt, grid_crs_wkt, index_grid)
        chips = []
        kept_footprints = []
        best_valid_fraction = 0.0
        for bounds in footprints:
            chip, valid = raster.read_chip(bounds, grid_crs_wkt, index_grid.tile_size_px, stretch)
            reason = chip_skip_reason(chip, valid, encoder.spec.value_scale)
            if reason == SKIP_MOSTLY_INVALID:
                valid_fraction = float(np.count_nonzero(valid)) / valid.size
                best_valid_fraction = max(best_valid_fraction, valid_fraction)
                LOGGER.info("Dropping query chip %s: %.0f %% valid pixels", bounds, 100 * valid_fraction)
                continue
            chips.append(chip)
            kept_footprints.append(bounds)
    finally:
        if raster is not source:
            raster.close()
    if not chips:
        raise SearchError(_no_query_chip_message(raster.path, best_valid_fraction, index_grid.tile_ground_size))
    embeddings = encoder.encode(np.stack(chips))
    return QueryChips(embeddings=embeddings, footprints=kept_footprints, crs_wkt=grid_crs_wkt)


def _no_query_chip_message(path: str, best_valid_fraction: float, tile_ground_size: float) -> str:
    if best_valid_fraction == 0.0:
        return f"The query geometry covers no valid pixels of {path!r}; draw it over the imagery."
    # The geometry may well sit on image pixels: the chip is a whole tile around it, and that
    # tile reaches past the raster edge or into nodata.
    return (
        f"The query chip ({tile_ground_size:.4g} CRS units wide, centred on the geometry) has only "
        f"{100 * best_valid_fraction:.0f} % valid pixels of {path!r}, below the threshold of "
        f"{100 * DEFAULT_MIN_VALID_FRACTION:.0f} %: most of it lies outside the raster or on nodata. Draw the "
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
    normalised = _normalised_path(os.fspath(path))
    for record in manifest["sources"]:
        if _same_source_path(record.get("path"), normalised):
            return tuple(record["band_indexes"])
    return None


def _query_footprints(wkt: str, crs_wkt: str, grid_crs_wkt: str, index_grid: TileGrid) -> list[Bounds]:
    geometry = _parse_geometry(transform_geometry_wkt(wkt, crs_wkt, grid_crs_wkt))
    tile = index_grid.tile_ground_size
    xmin, xmax, ymin, ymax = geometry.GetEnvelope()
    geometry_type = ogr.GT_Flatten(geometry.GetGeometryType())
    if geometry_type not in (ogr.wkbPoint, ogr.wkbPolygon, ogr.wkbMultiPolygon):
        raise SearchError(
            f"query geometry of type {geometry.GetGeometryName()} is not supported; draw a point, "
            "a rectangle or a polygon."
        )
    if geometry_type == ogr.wkbPoint or (xmax - xmin <= tile and ymax - ymin <= tile):
        centre_x, centre_y = (xmin + xmax) / 2.0, (ymin + ymax) / 2.0
        half = tile / 2.0
        return [(centre_x - half, centre_y - half, centre_x + half, centre_y + half)]
    grid = TileGrid.covering((xmin, ymin, xmax, ymax), grid_crs_wkt, index_grid.gsd, index_grid.tile_size_px)
    if geometry_type == ogr.wkbPolygon and _is_rectangle(geometry):
        tile_ids = list(grid.tile_ids())
    else:
        tile_ids = grid.tiles_intersecting_polygons([geometry.ExportToWkt()])
    return [grid.tile_bounds(row, col) for row, col in tile_ids]


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

    This is the one search entry point of the dock, the Processing algorithm and the CLI.
    Geometries are ``(xmin, ymin, xmax, ymax)`` tuples or WKT in ``crs_wkt`` (default: the CRS
    of ``source``); each is read with :func:`embed_query`. Matches that overlap a positive's
    footprint are dropped, so the query object itself does not come back. ``encoder_path``
    defaults to the encoder recorded in the index, then the bundled one.

    Raises:
        SearchIndexError: the index is missing, damaged or was built with another encoder.
        SearchError: no positive geometry was given or one covers only nodata.
    """
    if not positives:
        raise SearchError("No positive geometry was given; draw at least one example of what to find.")
    index = TileIndex.open(index_folder)
    encoder = OnnxEncoder(encoder_path or _index_encoder_path(index))
    index.check_encoder(encoder.name, encoder.checksum)
    raster = RasterSource(os.fspath(source), _band_indexes_for(index.manifest, source))
    try:
        query_crs_wkt = crs_wkt or raster.crs_wkt
        positive_chips = [embed_query(index, encoder, raster, geometry, query_crs_wkt) for geometry in positives]
        negative_chips = [embed_query(index, encoder, raster, geometry, query_crs_wkt) for geometry in negatives]
    finally:
        raster.close()

    positive_embeddings = np.concatenate([chips.embeddings for chips in positive_chips])
    negative_embeddings = (
        np.concatenate([chips.embeddings for chips in negative_chips]) if negative_chips else None
    )
    exclude = [(bounds, chips.crs_wkt) for chips in positive_chips for bounds in chips.footprints]
    matches = search(
        index,
        positive_embeddings,
        negative_embeddings,
        k=k,
        exclude=exclude,
        max_overlap=max_overlap,
        min_score=min_score,
        strategy=strategy,
    )
    LOGGER.info("Search in %s with %d positive and %d negative chips returned %d matches",
                index_folder, len(positive_embeddings),
                0 if negative_embeddings is None else len(negative_embeddings), len(matches))
    return matches


def _index_encoder_path(index: TileIndex) -> Path:
    """Return the encoder file recorded in the index when it still exists, else the bundled model."""
    recorded = index.build_parameters.get("encoder_path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    return default_model_path()
