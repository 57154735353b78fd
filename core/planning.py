"""Planning of a build: one grid, value stretch and tile selection per source, and the build id."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from . import get_logger
from .checkpoints import PARTIAL_FORMAT_VERSION
from .crs import grid_scale, scale_factor_at, spatial_reference
from .encoder import OnnxEncoder
from .errors import GridError, LookalikeError, SearchIndexError
from .grid import (
    Bounds,
    TileGrid,
    gsd_from_source_pixels,
    gsd_from_tile_ground_size,
    gsd_in_units,
    stride_from_overlap,
)
from .parameters import (
    DEFAULT_TILE_SIZE_SOURCE_PX,
    MIN_DEFAULT_TILE_SIZE_SOURCE_PX,
    MIN_SOURCE_PIXELS_PER_TILE,
    MIN_TILE_SIZE_SOURCE_PX,
    BuildParameters,
    Region,
    _normalised_path,
    _parse_geometry,
)
from .raster import DEFAULT_BLANK_STD_FRACTION, RasterSource, vrt_member_files
from .spec import ModelSpec

LOGGER = get_logger("pipeline")

# A grid whose CRS scale was applied (Web Mercator and the like) fits its tiles to the ground at
# the raster's centre. Beyond this deviation at a corner of the raster the build warns, because
# tiles there cover visibly more or less ground than the encoder's tile size.
MAX_TILE_GROUND_SIZE_DEVIATION = 0.05


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
    params: BuildParameters,
    spec: ModelSpec,
    first_source: RasterSource,
    grid_crs_wkt: str,
    units_per_metre: float,
) -> tuple[float, Optional[str]]:
    """Return the GSD of a new grid in grid CRS units, and a warning when the tile size changed.

    Ground sizes in metres (``tile_ground_size_m`` and the encoder's suggestion) become grid CRS
    lengths through ``units_per_metre``. ``tile_size_source_px`` and the minimum tile sizes
    count source pixels, whose size is measured in grid CRS units.
    """
    tile_size_px = spec.input_size_px
    pixel_size = _pixel_size_in(first_source, grid_crs_wkt)
    pixel_size_m = pixel_size / units_per_metre
    if params.tile_ground_size_m is not None:
        tile_ground_size = params.tile_ground_size_m * units_per_metre
        tile_size_source_px = tile_ground_size / pixel_size
        if tile_size_source_px < MIN_TILE_SIZE_SOURCE_PX:
            min_tile_ground_size_m = math.ceil(MIN_TILE_SIZE_SOURCE_PX * pixel_size_m * 100) / 100
            raise GridError(
                f"tile_ground_size_m {params.tile_ground_size_m:g} is only {tile_size_source_px:.4g} source "
                f"pixels of {first_source.path!r} ({pixel_size_m:.6g} m per pixel on the ground); pass "
                f"tile_ground_size_m >= {min_tile_ground_size_m:.10g} ({MIN_TILE_SIZE_SOURCE_PX:g} source pixels), "
                f"which is a GSD of at least {min_tile_ground_size_m / tile_size_px:.4g} m per encoder pixel at the "
                f"encoder's input size of {tile_size_px} px."
            )
        return gsd_from_tile_ground_size(tile_ground_size, tile_size_px), None
    if params.tile_size_source_px is not None:
        if params.tile_size_source_px < MIN_TILE_SIZE_SOURCE_PX:
            raise GridError(
                f"tile_size_source_px {params.tile_size_source_px:g} is below the minimum of "
                f"{MIN_TILE_SIZE_SOURCE_PX:g} source pixels, so a chip would hold no texture; pass "
                f"tile_size_source_px >= {MIN_TILE_SIZE_SOURCE_PX:g}, e.g. 64."
            )
        return gsd_from_source_pixels(params.tile_size_source_px, pixel_size, tile_size_px), None

    spec_ground_size_m = spec.tile_ground_size_m
    if spec_ground_size_m is None and spec.gsd_m is not None:
        spec_ground_size_m = float(spec.gsd_m) * tile_size_px
    if spec_ground_size_m is None:
        return gsd_from_source_pixels(DEFAULT_TILE_SIZE_SOURCE_PX, pixel_size, tile_size_px), None
    spec_ground_size = spec_ground_size_m * units_per_metre
    if spec_ground_size >= MIN_DEFAULT_TILE_SIZE_SOURCE_PX * pixel_size:
        return gsd_from_tile_ground_size(spec_ground_size, tile_size_px), None
    warning = (
        f"The encoder's suggested tile of {spec_ground_size_m:g} m is only "
        f"{spec_ground_size / pixel_size:.3g} source pixels of {first_source.path!r} ({pixel_size_m:.4g} m "
        f"per pixel); using tiles of {MIN_DEFAULT_TILE_SIZE_SOURCE_PX:g} source pixels "
        f"({MIN_DEFAULT_TILE_SIZE_SOURCE_PX * pixel_size_m:.4g} m) instead. Pass tile_size_source_px or "
        "tile_ground_size_m to choose another size."
    )
    LOGGER.warning("%s", warning)
    return gsd_from_source_pixels(MIN_DEFAULT_TILE_SIZE_SOURCE_PX, pixel_size, tile_size_px), warning


def _pixel_size_in(source: RasterSource, crs_wkt: str) -> float:
    """Return the source's mean pixel size in ``crs_wkt`` units."""
    return source.mean_pixel_size_in(crs_wkt)


def _check_no_source_in_a_vrt(source_paths: Sequence[str]) -> None:
    """Raise LookalikeError when two sources read one file: a file and a VRT that reads it, or two VRTs."""
    reader_of: dict[str, str] = {}
    for path in source_paths:
        if path.lower().endswith(".vrt"):
            files = vrt_member_files(path) or []
        elif os.path.exists(path):
            files = [path]
        else:
            files = []
        for file in files:
            real_path = os.path.realpath(file)
            earlier = reader_of.get(real_path)
            if earlier is not None and earlier != path:
                raise LookalikeError(
                    f"source_paths lists {earlier!r} and {path!r}, which both read {file!r}, so its tiles would be "
                    "indexed twice; pass each file once, either on its own or through one VRT."
                )
            reader_of[real_path] = path


def _plan_sources(
    params: BuildParameters, spec: ModelSpec, existing_grid: Optional[TileGrid], warnings: list[str]
) -> list[_SourcePlan]:
    """Open every source once to lay its grid and compute its value stretch.

    Warnings for the user (e.g. a tile size other than the encoder's) are appended to ``warnings``.
    """
    plans: list[_SourcePlan] = []
    # The rasters the extent misses. An extent that misses every raster is an error.
    outside: list[GridError] = []
    # The first source's GSD and its grid CRS units per ground metre. Every later source gets
    # the same GSD in metres, converted to its own grid CRS.
    first_gsd: Optional[float] = None
    first_units_per_metre = 1.0
    stride_px = stride_from_overlap(spec.input_size_px, overlap_fraction=params.overlap_fraction)
    _check_no_source_in_a_vrt(params.source_paths)
    for position, path in enumerate(params.source_paths):
        source = RasterSource(path, params.band_indexes)
        try:
            source.check_vrt_members_share_crs()
            if len(source.band_indexes) != spec.band_count:
                raise LookalikeError(
                    f"raster {path!r} gives {len(source.band_indexes)} bands {list(source.band_indexes)} but "
                    f"encoder {spec.name} takes {spec.band_count} ({', '.join(spec.bands)}); pass "
                    f"band_indexes with {spec.band_count} band numbers."
                )
            LOGGER.info("Source %s: encoder bands %s read from bands %s (%s)", path, list(spec.bands),
                        list(source.band_indexes), source.band_selection_reason)
            warning = _band_guess_warning(source, spec)
            if warning is not None:
                LOGGER.warning("%s", warning)
                warnings.append(warning)
            grid_crs_wkt = source.grid_crs_wkt()
            raster_bounds = source.bounds_in(grid_crs_wkt)
            scale = grid_scale(grid_crs_wkt, raster_bounds)
            if first_gsd is None:
                first_gsd, warning = _resolve_gsd(
                    params, spec, source, grid_crs_wkt, scale.units_per_metre, existing_grid
                )
                first_units_per_metre = scale.units_per_metre
                if warning is not None:
                    warnings.append(warning)
                if existing_grid is not None and existing_grid.stride_px != stride_px:
                    raise GridError(
                        f"overlap_fraction {params.overlap_fraction!r} gives a stride of {stride_px} px, but "
                        f"the index was built with a stride of {existing_grid.stride_px} of "
                        f"{existing_grid.tile_size_px} px; pass overlap_fraction="
                        f"{existing_grid.overlap_fraction:g}."
                    )

            gsd = gsd_in_units(first_gsd, first_units_per_metre, scale.units_per_metre)
            if scale.scale_factor is not None:
                warning = _ground_size_deviation_warning(path, grid_crs_wkt, raster_bounds, scale.scale_factor)
                if warning is not None:
                    LOGGER.warning("%s", warning)
                    warnings.append(warning)
            extent_polygons = None if params.extent is None else ()
            grid_bounds = raster_bounds
            outside_extent = False
            if params.extent is not None:
                try:
                    extent_polygons = _region_polygons(params.extent, "extent", grid_crs_wkt, raster_bounds, path)
                    grid_bounds = _clip_bounds(raster_bounds, extent_polygons, path)
                except GridError as error:
                    if len(params.source_paths) == 1:
                        raise
                    # With several rasters the extent may cover only some. The others are recorded
                    # with 0 tiles, as a raster of nodata is, and an extent outside all is an error.
                    outside.append(error)
                    outside_extent = True
                    warning = f"Raster {path!r} lies outside the extent, so none of its tiles are read."
                    LOGGER.warning("%s", warning)
                    warnings.append(warning)
            overlap_px = spec.input_size_px - stride_px
            grid = TileGrid.covering(
                grid_bounds, grid_crs_wkt, gsd, spec.input_size_px, overlap_px=overlap_px,
                scale_factor=scale.scale_factor,
            )
            selected = None
            if outside_extent:
                selected = ()
            elif extent_polygons is not None:
                selected = tuple(grid.tiles_intersecting_polygons(extent_polygons))
            mask_polygons = (tuple(_region_polygons(params.mask, "mask", grid_crs_wkt, raster_bounds, path))
                             if params.mask is not None else ())

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
                "Source %s: grid of %d x %d tiles of %.1f CRS units (%.1f m on the ground, gsd %.4g, "
                "stride %d px), %d to read",
                path, grid.n_rows, grid.n_cols, grid.tile_ground_size, grid.tile_ground_size / scale.units_per_metre,
                grid.gsd, grid.stride_px, plans[-1].tile_count,
            )
            _check_tile_count(plans[-1])
        finally:
            source.close()
    if outside and len(outside) == len(plans):
        names = ", ".join(repr(Path(plan.path).name) for plan in plans)
        raise GridError(
            f"the extent lies outside every raster ({names}); choose an extent over them or leave it unset."
        )
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
    span_px = plan.tile_size_source_px
    if span_px < MIN_TILE_SIZE_SOURCE_PX:
        # Every raster of an index shares one tile size, taken from its first raster. A much
        # coarser raster then gets tiles of a few of its pixels, which no overlap setting helps.
        raise GridError(
            f"raster {plan.path!r} is too coarse for the index's tile size: a tile spans only {span_px:.3g} of its "
            f"pixels, and at least {MIN_TILE_SIZE_SOURCE_PX:g} are needed; index it in an index of its own (or, for a "
            "new index of several rasters, pass a tile size that suits every raster)."
        )
    max_tiles = max(1, plan.width_px * plan.height_px // MIN_SOURCE_PIXELS_PER_TILE)
    if plan.tile_count <= max_tiles:
        return
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


def _band_guess_warning(source: RasterSource, spec: ModelSpec) -> Optional[str]:
    """Return a warning when the bands of a multi-band raster were picked by position, not by colour.

    A single-band raster has no other choice, so it gets none.
    """
    if not source.bands_by_position:
        return None
    image_bands = source.band_count - (source.alpha_band_index is not None)
    if image_bands < 2:
        return None
    return (
        f"Raster {source.path!r} has {image_bands} bands without red, green and blue colour interpretation, so "
        f"bands {list(source.band_indexes)} are read as the encoder's {', '.join(spec.bands)}; choose the bands "
        "to read (band_indexes) when those are other bands."
    )


def _resolve_gsd(
    params: BuildParameters,
    spec: ModelSpec,
    source: RasterSource,
    grid_crs_wkt: str,
    units_per_metre: float,
    existing_grid: Optional[TileGrid],
) -> tuple[float, Optional[str]]:
    """Return the GSD of this build in ``grid_crs_wkt`` units, and a warning when the tile size changed.

    With an index to add to, its first grid's GSD is converted to ``grid_crs_wkt`` through the
    ground metres, so a source in another CRS gets tiles of the index's ground size.
    """
    tile_size_given = params.tile_size_source_px is not None or params.tile_ground_size_m is not None
    if existing_grid is None:
        return _choose_gsd(params, spec, source, grid_crs_wkt, units_per_metre)
    if existing_grid.tile_size_px != spec.input_size_px:
        raise SearchIndexError(
            f"the index grid reads {existing_grid.tile_size_px} px chips but encoder {spec.name} takes "
            f"{spec.input_size_px} px; add the sources with the index's encoder."
        )
    index_gsd = gsd_in_units(existing_grid.gsd, existing_grid.units_per_metre, units_per_metre)
    if not tile_size_given:
        return index_gsd, None
    gsd, _ = _choose_gsd(params, spec, source, grid_crs_wkt, units_per_metre)
    if not math.isclose(gsd, index_gsd, rel_tol=1e-6):
        index_tile_m = existing_grid.tile_ground_size_m
        if params.tile_size_source_px is not None:
            # Suggested in the unit the caller used.
            pixel_m = _pixel_size_in(source, grid_crs_wkt) / units_per_metre
            suggestion = f"tile_size_source_px={index_tile_m / pixel_m:.6g}"
        else:
            suggestion = f"tile_ground_size_m={index_tile_m:.6g}"
        raise GridError(
            f"the tile size gives a GSD of {gsd / units_per_metre:.6g} m but the index was built at "
            f"{existing_grid.gsd_m:.6g} m (tiles of {index_tile_m:.6g} m on the ground); leave the tile "
            f"size unset to use the index's, or pass {suggestion}."
        )
    return gsd, None


def _ground_size_deviation_warning(
    path: str, grid_crs_wkt: str, raster_bounds: Bounds, scale_factor: float
) -> Optional[str]:
    """Return a warning when tiles at the raster's corners differ much in ground size from those at its centre.

    The grid's GSD fits the CRS's scale at the raster's centre. Where the scale differs, a tile of
    the same CRS size covers ``scale_factor / local scale`` times the ground of a centre tile.
    """
    xmin, ymin, xmax, ymax = raster_bounds
    corner_scales = [scale_factor_at(grid_crs_wkt, x, y) for x in (xmin, xmax) for y in (ymin, ymax)]
    ground_ratios = [scale_factor / corner for corner in corner_scales if corner is not None]
    if not ground_ratios:
        return None
    smallest, largest = min(ground_ratios), max(ground_ratios)
    if max(largest - 1.0, 1.0 - smallest) <= MAX_TILE_GROUND_SIZE_DEVIATION:
        return None
    crs_name = spatial_reference(grid_crs_wkt).GetName()
    return (
        f"Raster {path!r} spans so much of {crs_name}, whose scale changes across it, that tiles at its "
        f"corners cover {100 * smallest:.0f} % to {100 * largest:.0f} % of the ground size of the tiles "
        "at its centre. Reproject it to a CRS made for the area (e.g. its UTM zone with gdalwarp -t_srs) "
        "for tiles of one ground size."
    )


def _region_polygons(region: Region, role: str, grid_crs_wkt: str, raster_bounds: Bounds, path: str) -> list[str]:
    """Return the polygons of the build's extent or mask (``role``) in the grid CRS of raster ``path``."""
    try:
        return region.polygons_in(grid_crs_wkt, near_bounds=raster_bounds)
    except GridError as error:
        # Points the raster's CRS cannot map lie far from the raster, beyond its CRS's area of use.
        raise GridError(
            f"the {role} cannot be brought into the grid CRS of raster {path!r} ({error}), so it lies far from "
            f"the raster; choose a {role} over the raster, check the CRS of its layer, or leave it unset."
        ) from error


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


def _build_settings(params: BuildParameters, encoder: OnnxEncoder, plans: Sequence[_SourcePlan]) -> dict[str, Any]:
    """Return everything that decides which tiles get which embeddings, as a JSON-safe dict.

    ``batch_size``, ``prefetch_batches`` and ``encoder_threads`` are left out: chunks are keyed
    by tile position, so a build can resume with another batch size or thread count. The HNSW
    parameters are left out because the chunks contain embeddings only.
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
    return json.loads(json.dumps(content, default=str))


def _build_id(settings: Mapping[str, Any]) -> str:
    """Hash the settings of :func:`_build_settings` into the id that keys a build's checkpoints."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

