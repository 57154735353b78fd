"""The tile grid: a regular lattice of square tiles laid over a raster at the encoder's input GSD.

A tile is identified by ``(row, col)``. Row 0 is the top (north-most) row and col 0 the left
(west-most) column. Because a tile's footprint follows from the grid parameters alone, indexes
store tile ids and recompute footprints with :meth:`TileGrid.tile_bounds`.

Tile-count formula (per axis, ``extent`` in CRS units along that axis)::

    tile   = gsd * tile_size_px                  # tile_ground_size
    stride = gsd * stride_px                     # stride_ground
    n      = max(1, ceil((extent - tile) / stride) + 1)

The first tile starts at the extent's top-left corner. Tiles advance by ``stride`` until one
reaches the far edge, so every point of the extent lies in at least one tile. When ``extent -
tile`` is not a multiple of ``stride``, the last tile runs past the right or bottom edge. Its
outside part is not image data, and the raster reader marks it invalid in the chip's validity
mask. An extent smaller than one tile gives exactly one tile along that axis, anchored at the
top-left corner. An extent that is an exact multiple gives no extra tile; a relative tolerance
of ``1e-9`` absorbs floating-point noise in ``(extent - tile) / stride``.

Examples (one axis, ``tile = 224``, in encoder pixels): extent 224, stride 224 gives 1 tile;
extent 225, stride 224 gives 2; extent 448, stride 112 (50 % overlap) gives 3; extent 10 gives 1.

Units: ``gsd``, ``tile_ground_size`` and ``stride_ground`` are grid CRS units, because they
place tiles in CRS coordinates. The same values in metres on the ground are ``gsd_m`` and
``tile_ground_size_m``, converted with :func:`core.crs.grid_scale` (the CRS's linear unit, and
its scale factor where the CRS is far from true to scale).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from osgeo import gdal, ogr

from . import get_logger
from .crs import grid_scale
from .crs import units_per_metre as crs_units_per_metre
from .errors import GridError

LOGGER = get_logger("grid")

Bounds = tuple[float, float, float, float]
TileId = tuple[int, int]

# A tile is dropped from the build when more than this fraction of its area lies under mask
# polygons. Half keeps tiles whose content is still mostly the area the analyst wants searched.
DEFAULT_MAX_MASKED_FRACTION = 0.5

# Absorbs floating-point noise so an extent that is an exact multiple of the stride gets no
# extra tile (e.g. 0.1 * 3 / 0.1 evaluating to 3.0000000000000004).
_COUNT_TOLERANCE = 1e-9


def validate_bounds(bounds: Sequence[float], description: str = "bounds") -> Bounds:
    """Return ``bounds`` as a float 4-tuple, raising GridError unless xmin < xmax and ymin < ymax."""
    if len(bounds) != 4:
        raise GridError(f"{description} {tuple(bounds)!r} must have 4 values; pass (xmin, ymin, xmax, ymax).")
    xmin, ymin, xmax, ymax = (float(value) for value in bounds)
    if not all(math.isfinite(value) for value in (xmin, ymin, xmax, ymax)):
        raise GridError(f"{description} {tuple(bounds)!r} contain a non-finite value; pass finite coordinates.")
    if not (xmin < xmax and ymin < ymax):
        raise GridError(
            f"{description} {tuple(bounds)!r} are empty or inverted; pass (xmin, ymin, xmax, ymax) with "
            "xmin < xmax and ymin < ymax."
        )
    return xmin, ymin, xmax, ymax


def gsd_from_tile_ground_size(tile_ground_size: float, tile_size_px: int) -> float:
    """Return the GSD (CRS units per encoder pixel) that makes one tile span ``tile_ground_size``."""
    _validate_tile_size_px(tile_size_px)
    if not (math.isfinite(tile_ground_size) and tile_ground_size > 0):
        raise GridError(
            f"tile_ground_size {tile_ground_size!r} is invalid; pass a positive size in CRS units "
            "(metres for a metric CRS)."
        )
    return float(tile_ground_size) / tile_size_px


def gsd_from_source_pixels(tile_size_source_px: float, source_pixel_size: float, tile_size_px: int) -> float:
    """Return the GSD that makes one tile cover ``tile_size_source_px`` pixels of the source raster.

    ``source_pixel_size`` is the source's pixel size in grid CRS units. With
    ``tile_size_source_px == tile_size_px`` chips are read at the source's native resolution.
    """
    if not (math.isfinite(tile_size_source_px) and tile_size_source_px > 0):
        raise GridError(
            f"tile_size_source_px {tile_size_source_px!r} is invalid; "
            "pass a positive number of source pixels."
        )
    if not (math.isfinite(source_pixel_size) and source_pixel_size > 0):
        raise GridError(
            f"source_pixel_size {source_pixel_size!r} is invalid; pass the positive pixel size in CRS units."
        )
    return gsd_from_tile_ground_size(tile_size_source_px * source_pixel_size, tile_size_px)


def gsd_in_units(gsd: float, from_units_per_metre: float, to_units_per_metre: float) -> float:
    """Convert a GSD between two grid CRSs, given the CRS units per ground metre of each.

    Returns ``gsd`` itself when both are equal, so sources in one CRS share a bit-identical GSD.
    """
    if from_units_per_metre == to_units_per_metre:
        return gsd
    return gsd / from_units_per_metre * to_units_per_metre


def stride_from_overlap(
    tile_size_px: int, overlap_fraction: Optional[float] = None, overlap_px: Optional[int] = None
) -> int:
    """Return the stride in encoder pixels for an overlap given as a fraction or in pixels.

    Give at most one of the two; with neither, tiles do not overlap. A fractional stride is
    rounded to the nearest pixel so that every tile starts on the encoder-pixel lattice.
    """
    _validate_tile_size_px(tile_size_px)
    if overlap_fraction is not None and overlap_px is not None:
        raise GridError(
            f"both overlap_fraction={overlap_fraction!r} and overlap_px={overlap_px!r} were given; "
            "pass only one of them."
        )
    if overlap_px is not None:
        if isinstance(overlap_px, bool) or int(overlap_px) != overlap_px:
            raise GridError(f"overlap_px {overlap_px!r} is invalid; pass a whole number of encoder pixels.")
        if not 0 <= overlap_px < tile_size_px:
            raise GridError(
                f"overlap_px {overlap_px!r} is out of range; pass 0 <= overlap_px < tile_size_px "
                f"({tile_size_px})."
            )
        stride_px = tile_size_px - int(overlap_px)
    elif overlap_fraction is not None:
        if not (math.isfinite(overlap_fraction) and 0 <= overlap_fraction < 1):
            raise GridError(
                f"overlap_fraction {overlap_fraction!r} is out of range; pass a value in [0, 1), "
                "e.g. 0.5 for half-overlapping tiles."
            )
        stride_px = round(tile_size_px * (1.0 - overlap_fraction))
    else:
        stride_px = tile_size_px
    if stride_px < 1:
        raise GridError(
            f"the overlap leaves a stride of {stride_px} px for tile_size_px {tile_size_px}; "
            "reduce the overlap so that the stride is at least 1 px."
        )
    return stride_px


def tile_count(extent: float, tile_ground_size: float, stride_ground: float) -> int:
    """Return the number of tiles along one axis: ``max(1, ceil((extent - tile) / stride) + 1)``."""
    steps = (extent - tile_ground_size) / stride_ground
    if steps <= 0:
        return 1
    return math.ceil(steps - _COUNT_TOLERANCE * max(1.0, steps)) + 1


def _validate_tile_size_px(tile_size_px: int) -> None:
    if isinstance(tile_size_px, bool) or int(tile_size_px) != tile_size_px or tile_size_px < 1:
        raise GridError(
            f"tile_size_px {tile_size_px!r} is invalid; pass the encoder's input size in pixels "
            "(a whole number >= 1, e.g. 224)."
        )


@dataclass(frozen=True)
class TileGrid:
    """A lattice of square tiles in one CRS, each read as ``tile_size_px`` x ``tile_size_px`` chips.

    ``origin_x`` and ``origin_y`` are the top-left corner of tile (0, 0). ``gsd`` is the ground
    sample distance at the encoder's input, in CRS units per encoder pixel (:attr:`gsd_m` gives
    it in metres on the ground). Tile ``(row, col)`` starts ``col * stride_ground`` east and
    ``row * stride_ground`` south of the origin. The tile-count formula and the edge rules are
    in the module docstring.

    ``scale_factor`` is the CRS metres per ground metre at the centre of the raster that the
    grid was laid over. It is stored only for a CRS that is far from true to scale there (see
    ``core.crs.TRUE_SCALE_TOLERANCE``), e.g. Web Mercator, and is None otherwise.
    """

    crs_wkt: str
    origin_x: float
    origin_y: float
    gsd: float
    tile_size_px: int
    stride_px: int
    n_rows: int
    n_cols: int
    scale_factor: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.crs_wkt, str) or not self.crs_wkt.strip():
            raise GridError("crs_wkt is empty; pass the grid CRS as WKT (e.g. from osr.ExportToWkt()).")
        if not (math.isfinite(self.origin_x) and math.isfinite(self.origin_y)):
            raise GridError(
                f"origin ({self.origin_x!r}, {self.origin_y!r}) is not finite; pass finite coordinates."
            )
        if not (isinstance(self.gsd, (int, float)) and math.isfinite(self.gsd) and self.gsd > 0):
            raise GridError(
                f"gsd {self.gsd!r} is invalid; pass a positive ground sample distance in CRS units per "
                "encoder pixel (metres for a metric CRS)."
            )
        _validate_tile_size_px(self.tile_size_px)
        if isinstance(self.stride_px, bool) or int(self.stride_px) != self.stride_px or self.stride_px < 1:
            raise GridError(
                f"stride_px {self.stride_px!r} is invalid; pass a whole number of encoder pixels >= 1."
            )
        for name in ("n_rows", "n_cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise GridError(f"{name} {value!r} is invalid; a grid has at least one row and one column.")
        if self.scale_factor is not None and not (
            isinstance(self.scale_factor, (int, float)) and math.isfinite(self.scale_factor) and self.scale_factor > 0
        ):
            raise GridError(
                f"scale_factor {self.scale_factor!r} is invalid; pass the CRS's positive scale factor "
                "(CRS metres per ground metre) or None for a CRS that is true to scale."
            )

    @classmethod
    def covering(
        cls,
        bounds: Sequence[float],
        crs_wkt: str,
        gsd: float,
        tile_size_px: int,
        overlap_fraction: Optional[float] = None,
        overlap_px: Optional[int] = None,
        scale_factor: Optional[float] = None,
    ) -> TileGrid:
        """Lay the smallest grid anchored at the top-left corner of ``bounds`` that covers them.

        ``bounds`` are ``(xmin, ymin, xmax, ymax)`` in ``crs_wkt`` and ``gsd`` is in its units.
        Give the overlap between neighbouring tiles as ``overlap_fraction`` in [0, 1) or as
        ``overlap_px`` encoder pixels, not both; with neither, tiles do not overlap.
        ``scale_factor`` is stored with the grid (see the class docstring).

        Raises:
            GridError: on empty bounds, a non-positive ``gsd``, ``tile_size_px`` < 1 or an overlap
                out of range. The message names the value and the valid range.
        """
        xmin, ymin, xmax, ymax = validate_bounds(bounds)
        if not (isinstance(gsd, (int, float)) and math.isfinite(gsd) and gsd > 0):
            raise GridError(
                f"gsd {gsd!r} is invalid; pass a positive ground sample distance in CRS units per "
                "encoder pixel (metres for a metric CRS)."
            )
        stride_px = stride_from_overlap(tile_size_px, overlap_fraction, overlap_px)
        tile_ground_size = gsd * tile_size_px
        stride_ground = gsd * stride_px
        grid = cls(
            crs_wkt=crs_wkt,
            origin_x=xmin,
            origin_y=ymax,
            gsd=float(gsd),
            tile_size_px=int(tile_size_px),
            stride_px=stride_px,
            n_rows=tile_count(ymax - ymin, tile_ground_size, stride_ground),
            n_cols=tile_count(xmax - xmin, tile_ground_size, stride_ground),
            scale_factor=scale_factor,
        )
        LOGGER.debug(
            "grid of %d x %d tiles (%d px, stride %d px, gsd %g) over %s",
            grid.n_rows,
            grid.n_cols,
            grid.tile_size_px,
            grid.stride_px,
            grid.gsd,
            (xmin, ymin, xmax, ymax),
        )
        return grid

    @property
    def tile_ground_size(self) -> float:
        """Side of one tile in CRS units."""
        return self.gsd * self.tile_size_px

    @property
    def stride_ground(self) -> float:
        """Distance between the corners of neighbouring tiles in CRS units."""
        return self.gsd * self.stride_px

    @property
    def overlap_fraction(self) -> float:
        """Overlap between neighbouring tiles as a fraction of the tile side; gives ``stride_px`` again."""
        return 1.0 - self.stride_px / self.tile_size_px

    @property
    def units_per_metre(self) -> float:
        """Grid CRS units that span one metre on the ground over this grid.

        A grid without ``scale_factor`` gets the CRS's scale measured at its own centre, so a
        grid record written before the key existed (e.g. in EPSG:3857) still converts right.
        """
        # NOTE: the grid's centre lies up to half a tile from its raster's. A scale that close to
        # TRUE_SCALE_TOLERANCE can fall on the other side of it here than when the grid was laid.
        if self.scale_factor is not None:
            return crs_units_per_metre(self.crs_wkt, self.scale_factor)
        return grid_scale(self.crs_wkt, self.bounds).units_per_metre

    @property
    def gsd_m(self) -> float:
        """Ground sample distance in metres on the ground per encoder pixel."""
        return self.gsd / self.units_per_metre

    @property
    def tile_ground_size_m(self) -> float:
        """Side of one tile in metres on the ground."""
        return self.gsd_m * self.tile_size_px

    @property
    def tile_count(self) -> int:
        """Number of tiles in the grid, including tiles that a mask or the validity rule later skips."""
        return self.n_rows * self.n_cols

    @property
    def bounds(self) -> Bounds:
        """Extent of all tiles together; reaches past the covered bounds when edge tiles overhang."""
        xmax = self.origin_x + (self.n_cols - 1) * self.stride_ground + self.tile_ground_size
        ymin = self.origin_y - (self.n_rows - 1) * self.stride_ground - self.tile_ground_size
        return self.origin_x, ymin, xmax, self.origin_y

    def tile_bounds(self, row: int, col: int) -> Bounds:
        """Return ``(xmin, ymin, xmax, ymax)`` of tile ``(row, col)`` in the grid CRS.

        Raises:
            GridError: when ``row`` or ``col`` is outside the grid.
        """
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise GridError(
                f"tile ({row}, {col}) is outside the grid of {self.n_rows} rows x {self.n_cols} columns; "
                f"pass 0 <= row < {self.n_rows} and 0 <= col < {self.n_cols}."
            )
        xmin = self.origin_x + col * self.stride_ground
        ymax = self.origin_y - row * self.stride_ground
        return xmin, ymax - self.tile_ground_size, xmin + self.tile_ground_size, ymax

    def tile_ids(self) -> Iterator[TileId]:
        """Yield every tile id in row-major order, without building a list."""
        for row in range(self.n_rows):
            for col in range(self.n_cols):
                yield row, col

    def tiles_intersecting(self, bounds: Sequence[float]) -> Iterator[TileId]:
        """Yield, in row-major order, the tiles whose area overlaps ``bounds`` (in the grid CRS).

        Tiles that only touch ``bounds`` along an edge or at a corner are not yielded.
        """
        xmin, ymin, xmax, ymax = validate_bounds(bounds)
        col_range = self._index_range(xmin - self.origin_x, xmax - self.origin_x, self.n_cols)
        row_range = self._index_range(self.origin_y - ymax, self.origin_y - ymin, self.n_rows)
        for row in row_range:
            for col in col_range:
                yield row, col

    def _index_range(self, start: float, end: float, count: int) -> range:
        """Return the indexes of tiles along one axis whose interval overlaps (start, end).

        Tile i spans ``[i * stride, i * stride + tile]`` measured from the origin, so it overlaps
        when ``i * stride < end`` and ``i * stride + tile > start``.
        """
        stride = self.stride_ground
        first = math.floor((start - self.tile_ground_size) / stride) + 1
        last = math.ceil(end / stride) - 1
        return range(max(0, first), min(count - 1, last) + 1)

    def tiles_intersecting_polygons(self, polygons_wkt: Iterable[str]) -> list[TileId]:
        """Return, in row-major order, the tiles whose area overlaps any of the polygons.

        ``polygons_wkt`` are WKT (Multi)Polygons in the grid CRS. Only tiles inside each polygon's
        envelope are tested, so a small area of interest over a large grid stays cheap. The
        pipeline reads only the returned tiles.

        Raises:
            GridError: when a WKT cannot be parsed or is not a polygon.
        """
        selected: set[TileId] = set()
        for geometry in _parse_polygons(polygons_wkt, "area-of-interest polygon"):
            env_xmin, env_xmax, env_ymin, env_ymax = geometry.GetEnvelope()
            if not (env_xmin < env_xmax and env_ymin < env_ymax):
                continue
            for tile_id in self.tiles_intersecting((env_xmin, env_ymin, env_xmax, env_ymax)):
                if tile_id in selected:
                    continue
                tile = _box(self.tile_bounds(*tile_id))
                if geometry.Intersects(tile) and geometry.Intersection(tile).GetArea() > 0:
                    selected.add(tile_id)
        return sorted(selected)

    def tiles_outside_mask(
        self,
        tile_ids: Iterable[TileId],
        mask_polygons_wkt: Iterable[str],
        max_masked_fraction: float = DEFAULT_MAX_MASKED_FRACTION,
    ) -> Iterator[TileId]:
        """Yield the tiles of ``tile_ids`` that the mask polygons do not cover.

        A tile is dropped when more than ``max_masked_fraction`` of its area lies under the union
        of the mask polygons (WKT, grid CRS). The default of 0.5 drops tiles that are mostly
        masked and keeps tiles whose majority is still to be searched.

        Raises:
            GridError: when a WKT cannot be parsed or is not a polygon, or the fraction is not in
                [0, 1].
        """
        if not (math.isfinite(max_masked_fraction) and 0 <= max_masked_fraction <= 1):
            raise GridError(
                f"max_masked_fraction {max_masked_fraction!r} is out of range; pass a value in [0, 1]."
            )
        polygons = _parse_polygons(mask_polygons_wkt, "mask polygon")
        mask = _union(polygons)
        tile_area = self.tile_ground_size**2
        for tile_id in tile_ids:
            if mask is None:
                yield tile_id
                continue
            tile = _box(self.tile_bounds(*tile_id))
            if not mask.Intersects(tile):
                yield tile_id
                continue
            masked_area = mask.Intersection(tile).GetArea()
            if masked_area <= max_masked_fraction * tile_area:
                yield tile_id

    def to_dict(self) -> dict[str, Any]:
        """Return the grid as a JSON-safe dict for the index manifest.

        ``scale_factor`` is left out when it is None, so grids in CRSs true to scale keep the
        record they had before the key existed.
        """
        record = asdict(self)
        if record["scale_factor"] is None:
            del record["scale_factor"]
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TileGrid:
        """Rebuild a grid from :meth:`to_dict` output.

        Raises:
            GridError: when a key is missing or a value is invalid.
        """
        names = [field.name for field in fields(cls) if field.name != "scale_factor"]
        missing = [name for name in names if name not in data]
        if missing:
            raise GridError(
                f"the grid record is missing {', '.join(missing)}; rebuild the index or restore its "
                "manifest.json."
            )
        return cls(
            crs_wkt=str(data["crs_wkt"]),
            origin_x=float(data["origin_x"]),
            origin_y=float(data["origin_y"]),
            gsd=float(data["gsd"]),
            tile_size_px=int(data["tile_size_px"]),
            stride_px=int(data["stride_px"]),
            n_rows=int(data["n_rows"]),
            n_cols=int(data["n_cols"]),
            scale_factor=None if data.get("scale_factor") is None else float(data["scale_factor"]),
        )


def _box(bounds: Bounds) -> ogr.Geometry:
    xmin, ymin, xmax, ymax = bounds
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in ((xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax), (xmin, ymin)):
        ring.AddPoint_2D(x, y)
    polygon = ogr.Geometry(ogr.wkbPolygon)
    polygon.AddGeometry(ring)
    return polygon


def _parse_polygons(polygons_wkt: Iterable[str], description: str) -> list[ogr.Geometry]:
    if isinstance(polygons_wkt, str):
        # A bare WKT string would otherwise be iterated character by character.
        polygons_wkt = [polygons_wkt]
    polygons = []
    for wkt in polygons_wkt:
        geometry = _geometry_from_wkt(wkt)
        if geometry is None:
            raise GridError(f"{description} {_shorten(wkt)!r} is not valid WKT; pass a POLYGON or MULTIPOLYGON.")
        if ogr.GT_Flatten(geometry.GetGeometryType()) not in (ogr.wkbPolygon, ogr.wkbMultiPolygon):
            raise GridError(
                f"{description} {_shorten(wkt)!r} is a {geometry.GetGeometryName()}; pass a POLYGON or "
                "MULTIPOLYGON in the grid CRS."
            )
        with quiet_gdal():
            if not geometry.IsValid():
                # Self-intersecting rings make Intersection() fail.
                geometry = repaired_polygons(geometry) or geometry.Buffer(0)
        polygons.append(geometry)
    return polygons


def polygons_of(geometry: Optional[ogr.Geometry]) -> Optional[ogr.Geometry]:
    """Return the polygons of a geometry (an intersection can add lines where edges touch), or None without any."""
    if geometry is None or geometry.IsEmpty():
        return None
    if ogr.GT_Flatten(geometry.GetGeometryType()) in (ogr.wkbPolygon, ogr.wkbMultiPolygon):
        return geometry
    polygons = ogr.Geometry(ogr.wkbMultiPolygon)
    for number in range(geometry.GetGeometryCount()):
        part = geometry.GetGeometryRef(number)
        if ogr.GT_Flatten(part.GetGeometryType()) == ogr.wkbPolygon:
            polygons.AddGeometry(part)
        elif ogr.GT_Flatten(part.GetGeometryType()) == ogr.wkbMultiPolygon:
            for index in range(part.GetGeometryCount()):
                polygons.AddGeometry(part.GetGeometryRef(index))
    return polygons if polygons.GetGeometryCount() else None


def repaired_polygons(geometry: ogr.Geometry) -> Optional[ogr.Geometry]:
    """Return everything inside the rings of an invalid polygon, or None when they enclose nothing.

    That is both lobes of a figure-eight and all of a star drawn point to point. GEOS's default
    repair keeps only the parts enclosed an odd number of times, so it drops the centre of such a
    star. Its "structure" method (GEOS 3.10, GDAL 3.4) keeps it. Without that method, the default
    repair and a zero-width buffer are merged: the buffer keeps the centre of a star but only one
    lobe of a figure-eight.
    """
    try:
        structure = geometry.MakeValid(["METHOD=STRUCTURE"])
    except (RuntimeError, TypeError):
        # GDAL before 3.4 takes no options; a GEOS without the method raises in exception mode.
        structure = None
    if structure is not None and not structure.IsEmpty():
        return polygons_of(structure)
    linework = geometry.MakeValid() if hasattr(geometry, "MakeValid") else None
    buffered = geometry.Buffer(0)
    if linework is None or buffered is None:
        return polygons_of(buffered or linework)
    return polygons_of(linework.Union(buffered))


@contextlib.contextmanager
def quiet_gdal() -> Iterator[None]:
    """Keep GDAL's and GEOS's messages (such as each self-intersection found) off stderr."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        yield
    finally:
        gdal.PopErrorHandler()


def _geometry_from_wkt(wkt: str) -> Optional[ogr.Geometry]:
    """Parse WKT whether or not the OGR bindings are in exception mode; None for invalid WKT, quietly."""
    with quiet_gdal():
        try:
            return ogr.CreateGeometryFromWkt(wkt)
        except RuntimeError:
            return None


def _union(polygons: list[ogr.Geometry]) -> Optional[ogr.Geometry]:
    if not polygons:
        return None
    multipolygon = ogr.Geometry(ogr.wkbMultiPolygon)
    for polygon in polygons:
        if ogr.GT_Flatten(polygon.GetGeometryType()) == ogr.wkbMultiPolygon:
            for part_index in range(polygon.GetGeometryCount()):
                multipolygon.AddGeometry(polygon.GetGeometryRef(part_index))
        else:
            multipolygon.AddGeometry(polygon)
    # Overlapping mask polygons must not count the same ground twice.
    return multipolygon.UnionCascaded()


def _shorten(text: str, max_chars: int = 60) -> str:
    text = str(text)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
