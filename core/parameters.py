"""Build parameters and reports, shared constants and the WKT geometry helpers of the pipeline."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from osgeo import gdal, ogr, osr

from .crs import spatial_reference
from .errors import GridError, LookalikeError
from .grid import Bounds, TileGrid, polygons_of, quiet_gdal, validate_bounds
from .raster import SKIP_BLANK, SKIP_MOSTLY_INVALID

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

# The largest tile overlap the dock and Processing offer, in percent of the tile side. At 95 %, a
# tile advances by a twentieth of its side.
MAX_OVERLAP_PERCENT = 95

# Upper limits of integer build parameters, each far above any useful value, so that a typing
# mistake is rejected instead of allocating for it. A batch of 224 px RGB chips takes 0.6 MiB per
# chip in float32, so 4096 chips take 2.4 GiB, times the prefetched batches. hnswlib's own
# guidance puts M between 2 and 100; each unit of M adds 8 bytes of links per tile on level 0.
# ef_construction sets the build time of every insert.
MAX_BUILD_INTEGERS = {
    "batch_size": 4096,
    "prefetch_batches": 64,
    "hnsw_m": 256,
    "hnsw_ef_construction": 4096,
}

# Chips a build may hold at once, (prefetch_batches + 1) * batch_size: about 4.6 GiB of 224 px RGB
# float32 chips.
MAX_CHIPS_IN_FLIGHT = 8192

# Larger thread counts are rejected as typing mistakes: for 10**9 threads onnxruntime failed
# with a bare allocation error instead of a message.
MAX_ENCODER_THREADS = 256


# -- parameters ---------------------------------------------------------------------------------


# A region whose envelope covers more than this many times a raster's surroundings (both in the
# region's CRS) is cut to those surroundings before it goes into the raster's CRS. A box around
# half the globe, drawn on a map in degrees, has no usable shape in a UTM zone far from it.
# Smaller regions go whole, so that a box dragged past a raster's edge keeps its centre.
FAR_REACHING_AREA_FACTOR = 100.0


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

    def polygons_in(self, target_crs_wkt: str, near_bounds: Optional[Bounds] = None) -> list[str]:
        """Return the region as polygon WKT strings transformed to ``target_crs_wkt``.

        With ``near_bounds`` (in ``target_crs_wkt``), polygons reaching far beyond them are first
        cut to their surroundings (see :func:`cut_to_surroundings`), which keeps every part that
        touches those bounds.
        """
        wkts = [_bounds_to_wkt(self.bounds)] if self.bounds is not None else list(self.polygons_wkt)
        if near_bounds is None:
            return [transform_geometry_wkt(wkt, self.crs_wkt, target_crs_wkt) for wkt in wkts]
        polygons = []
        for wkt in wkts:
            near_wkt = cut_to_surroundings(wkt, self.crs_wkt, near_bounds, target_crs_wkt)
            if near_wkt is None:
                # The polygon covers all of the surroundings, which are already in the target CRS.
                polygons.append(_bounds_to_wkt(_surroundings(near_bounds)))
            else:
                polygons.append(transform_geometry_wkt(near_wkt, self.crs_wkt, target_crs_wkt))
        return polygons

    def to_dict(self) -> dict[str, Any]:
        return {"crs_wkt": self.crs_wkt, "bounds": self.bounds, "polygons_wkt": list(self.polygons_wkt)}


@dataclass(frozen=True)
class BuildParameters:
    """Everything one index build needs; the dock, Processing and the CLI each fill one.

    Tile size: give ``tile_size_source_px`` (pixels of the first source raster) or
    ``tile_ground_size_m`` (metres on the ground, converted to each grid CRS's units and scale
    by ``core.crs.grid_scale``), not both. With neither, the encoder spec's
    ``tile_ground_size_m`` (or ``gsd_m * input_size_px``) is used when present, else
    ``DEFAULT_TILE_SIZE_SOURCE_PX``. Every source shares the resulting GSD, so tiles of several
    dates or strips are comparable. Tiles are read at the encoder's input size, so a tile of 48
    source pixels is upsampled to 224 encoder pixels for a 224 px encoder.

    Attributes:
        source_paths: rasters to index (files, VRTs or GDAL connection strings).
        index_folder: the index folder; it must be new, empty or an index.
        encoder_path: ONNX encoder; None selects the bundled model.
        tile_size_source_px: tile side in pixels of the first source.
        tile_ground_size_m: tile side in metres on the ground.
        overlap_fraction: overlap between neighbouring tiles in [0, 1); 0.5 halves the stride.
        extent: only tiles overlapping this region are indexed; None indexes whole rasters.
        mask: tiles more than ``1 - min_valid_fraction`` under these polygons are skipped.
        band_indexes: 1-based source bands, one per encoder band; None picks them from the
            colour interpretation.
        batch_size: chips per encoder run; also the checkpoint granularity.
        encoder_threads: threads onnxruntime uses inside each model operator; None uses one per
            physical core. With one thread fewer than the cores, the tile reader and QGIS keep a core.
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
        discard_other_checkpoints: delete the checkpoints of an interrupted build into
            ``index_folder`` with other settings, and start this build. Without it such a build
            stops with OtherBuildCheckpointsError, which names the settings that differ.
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
    encoder_threads: Optional[int] = None
    prefetch_batches: int = 2
    min_valid_fraction: float = 0.5
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    add_to_existing: bool = False
    overwrite_existing_index: bool = False
    discard_other_checkpoints: bool = False
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
        for name in ("extent", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Region):
                raise LookalikeError(
                    f"{name} {value!r} is a {type(value).__name__}; pass a Region, e.g. "
                    f"Region(bounds=(xmin, ymin, xmax, ymax), crs_wkt='EPSG:4326'), or None."
                )
        if self.tile_size_source_px is not None and self.tile_ground_size_m is not None:
            raise LookalikeError(
                f"both tile_size_source_px={self.tile_size_source_px!r} and tile_ground_size_m="
                f"{self.tile_ground_size_m!r} were given; pass only one of them."
            )
        for name in ("tile_size_source_px", "tile_ground_size_m"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise LookalikeError(f"{name} {value!r} is invalid; pass a positive number.")
        for name in ("overlap_fraction", "min_valid_fraction"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value)):
                raise LookalikeError(f"{name} {value!r} is not a number; pass a fraction such as 0.5.")
        if not 0.0 <= self.overlap_fraction < 1.0:
            raise LookalikeError(
                f"overlap_fraction {self.overlap_fraction!r} is out of range; pass a value in [0, 1), "
                "e.g. 0.5 for half-overlapping tiles."
            )
        if not 0.0 < self.min_valid_fraction <= 1.0:
            raise LookalikeError(
                f"min_valid_fraction {self.min_valid_fraction!r} is out of range; pass a value in (0, 1]."
            )
        for name in ("batch_size", "prefetch_batches", "hnsw_m", "hnsw_ef_construction", "max_tile_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LookalikeError(f"{name} {value!r} is invalid; pass a positive integer.")
            largest = MAX_BUILD_INTEGERS.get(name)
            if largest is not None and value > largest:
                raise LookalikeError(f"{name} {value!r} is too large; pass an integer from 1 to {largest}.")
        chips_in_flight = (self.prefetch_batches + 1) * self.batch_size
        if chips_in_flight > MAX_CHIPS_IN_FLIGHT:
            raise LookalikeError(
                f"batch_size {self.batch_size} with prefetch_batches {self.prefetch_batches} keeps "
                f"{chips_in_flight} chips in memory, more than {MAX_CHIPS_IN_FLIGHT}; lower one of them."
            )
        threads = self.encoder_threads
        is_integer = isinstance(threads, int) and not isinstance(threads, bool)
        if threads is not None and not (is_integer and 1 <= threads <= MAX_ENCODER_THREADS):
            raise LookalikeError(
                f"encoder_threads {threads!r} is invalid; pass an integer from 1 to {MAX_ENCODER_THREADS}, or None "
                "for one per core."
            )
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
    return spatial_reference(crs, GridError)


def _parse_geometry(wkt: str) -> ogr.Geometry:
    # The GridError below names the WKT, so OGR's own "Corrupt data" lines stay off stderr.
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        geometry = ogr.CreateGeometryFromWkt(wkt)
    except RuntimeError:
        geometry = None
    finally:
        gdal.PopErrorHandler()
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
    envelope = geometry.GetEnvelope()
    if ogr.GT_Flatten(geometry.GetGeometryType()) != ogr.wkbPoint:
        # Straight edges in one CRS are curves in another; 100 segments per edge follow them.
        longest_side = max(envelope[1] - envelope[0], envelope[3] - envelope[2])
        if longest_side > 0:
            geometry.Segmentize(longest_side / 100.0)
    transformation = osr.CoordinateTransformation(source_ref, target_ref)
    with quiet_gdal():
        transformed = geometry.Transform(transformation)
    if transformed != 0:
        raise GridError(
            f"the geometry cannot be transformed from {source_ref.GetName()} to {target_ref.GetName()} (it spans x "
            f"{envelope[0]:.6g} to {envelope[1]:.6g} and y {envelope[2]:.6g} to {envelope[3]:.6g} in "
            f"{source_ref.GetName()}); check that its coordinates are in that CRS and that it lies inside the area "
            "of use of both CRSs."
        )
    return geometry.ExportToWkt()


def cut_to_surroundings(wkt: str, crs_wkt: str, bounds: Sequence[float], bounds_crs_wkt: str) -> Optional[str]:
    """Return the region ``wkt`` (in ``crs_wkt``) cut to the surroundings of ``bounds`` when it reaches far beyond them.

    A far-reaching region can have no usable shape in the CRS of ``bounds``, so queries, build
    extents and masks are cut before they are transformed there.

    The surroundings are ``bounds`` (in ``bounds_crs_wkt``) widened by half their size on every
    side. Returns None when such a region covers all of the surroundings. Points, lines, regions
    no larger than ``FAR_REACHING_AREA_FACTOR`` times the surroundings and regions that miss them
    come back unchanged.
    """
    surroundings_bounds = _surroundings(bounds)
    try:
        surroundings = ogr.CreateGeometryFromWkt(
            transform_geometry_wkt(_bounds_to_wkt(surroundings_bounds), bounds_crs_wkt, crs_wkt))
        samples = ogr.CreateGeometryFromWkt(
            transform_geometry_wkt(_sample_points_wkt(surroundings_bounds), bounds_crs_wkt, crs_wkt))
    except GridError:
        return wkt
    geometry = ogr.CreateGeometryFromWkt(wkt)
    if geometry is None or surroundings is None or geometry.GetDimension() < 2:
        return wkt
    if _envelope_area(geometry) <= FAR_REACHING_AREA_FACTOR * _envelope_area(surroundings):
        return wkt
    if surroundings.IsValid():
        # Contains() accounts for holes, which a test of sample points could miss.
        with quiet_gdal():
            if geometry.Contains(surroundings):
                return None
            cut = polygons_of(geometry.Intersection(surroundings))
        return wkt if cut is None else cut.ExportToWkt()
    # Across the antimeridian the surroundings are no valid polygon in degrees, so points are
    # tested one by one. A hole could lie between them, so a polygon with holes stays whole.
    if _has_holes(geometry):
        return wkt
    if all(geometry.Intersects(samples.GetGeometryRef(number)) for number in range(samples.GetGeometryCount())):
        return None
    return wkt


def _has_holes(geometry: ogr.Geometry) -> bool:
    if ogr.GT_Flatten(geometry.GetGeometryType()) == ogr.wkbPolygon:
        return geometry.GetGeometryCount() > 1
    return any(_has_holes(geometry.GetGeometryRef(number)) for number in range(geometry.GetGeometryCount()))


def _surroundings(bounds: Sequence[float]) -> Bounds:
    """Return ``bounds`` widened by half their size on every side."""
    xmin, ymin, xmax, ymax = bounds
    pad_x, pad_y = (xmax - xmin) / 2.0, (ymax - ymin) / 2.0
    return (xmin - pad_x, ymin - pad_y, xmax + pad_x, ymax + pad_y)


def _sample_points_wkt(bounds: Sequence[float]) -> str:
    """Return a MULTIPOINT of the corners, edge midpoints and centre of ``bounds``."""
    xmin, ymin, xmax, ymax = bounds
    xs, ys = (xmin, (xmin + xmax) / 2.0, xmax), (ymin, (ymin + ymax) / 2.0, ymax)
    return "MULTIPOINT (" + ", ".join(f"({x!r} {y!r})" for x in xs for y in ys) + ")"


def _envelope_area(geometry: ogr.Geometry) -> float:
    xmin, xmax, ymin, ymax = geometry.GetEnvelope()
    return (xmax - xmin) * (ymax - ymin)


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
