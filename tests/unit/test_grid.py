"""Tile grid: the tile-count formula, edge tiles, selection by area and mask, and validation."""

import itertools
import json
import math

import pytest
from osgeo import gdal, ogr, osr

from lookalike.core.errors import GridError
from lookalike.core.grid import (
    TileGrid,
    gsd_from_source_pixels,
    gsd_from_tile_ground_size,
    stride_from_overlap,
    tile_count,
)


def utm18n_wkt() -> str:
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(32618)
    return spatial_ref.ExportToWkt()


CRS_WKT = utm18n_wkt()


def make_grid(width: float = 1000.0, height: float = 600.0, gsd: float = 1.0, tile_size_px: int = 100,
              **overlap) -> TileGrid:
    return TileGrid.covering((500.0, 2000.0, 500.0 + width, 2000.0 + height), CRS_WKT, gsd, tile_size_px, **overlap)


def box_wkt(xmin: float, ymin: float, xmax: float, ymax: float) -> str:
    return f"POLYGON (({xmin} {ymin}, {xmax} {ymin}, {xmax} {ymax}, {xmin} {ymax}, {xmin} {ymin}))"


# extent_px, tile_px, stride_px, expected tiles along the axis
COUNT_CASES = [
    (224, 224, 224, 1),  # exactly one tile
    (225, 224, 224, 2),  # one pixel more needs a second, overhanging tile
    (448, 224, 224, 2),  # exact multiple: no extra tile
    (449, 224, 224, 3),
    (448, 224, 112, 3),  # 50 % overlap
    (500, 224, 112, 4),
    (1000, 224, 168, 6),  # 25 % overlap: ceil(776 / 168) + 1
    (10, 224, 224, 1),  # raster smaller than one tile
    (1, 224, 1, 1),  # tiny raster with a 1 px stride
    (230, 224, 1, 7),  # stride of one pixel
    (3, 1, 1, 3),  # one-pixel tiles
    (79, 224, 200, 1),
]


@pytest.mark.parametrize(("extent_px", "tile_px", "stride_px", "expected"), COUNT_CASES)
@pytest.mark.parametrize("gsd", [1.0, 0.3, 30.0, 1e-4])
def test_tile_count_formula_table(extent_px, tile_px, stride_px, expected, gsd):
    assert tile_count(extent_px * gsd, tile_px * gsd, stride_px * gsd) == expected
    grid = TileGrid.covering(
        (0.0, 0.0, extent_px * gsd, extent_px * gsd), CRS_WKT, gsd, tile_px, overlap_px=tile_px - stride_px
    )
    assert grid.n_cols == expected
    assert grid.n_rows == expected
    assert grid.stride_px == stride_px


@pytest.mark.parametrize(
    ("width", "height", "tile_size_px", "overlap_fraction"),
    [
        (1000.0, 600.0, 100, 0.0),
        (1000.0, 600.0, 100, 0.5),
        (999.9, 100.1, 64, 0.25),
        (37.0, 12.0, 224, 0.0),  # smaller than one tile
        (300.0, 300.0, 7, 0.9),
    ],
)
def test_covering_covers_every_point(width, height, tile_size_px, overlap_fraction):
    grid = make_grid(width, height, gsd=1.0, tile_size_px=tile_size_px, overlap_fraction=overlap_fraction)
    xmin, ymin, xmax, ymax = 500.0, 2000.0, 500.0 + width, 2000.0 + height
    footprints = [grid.tile_bounds(row, col) for row, col in grid.tile_ids()]
    steps = 23
    for i, j in itertools.product(range(steps + 1), repeat=2):
        x = xmin + (xmax - xmin) * i / steps
        y = ymin + (ymax - ymin) * j / steps
        covering = [b for b in footprints if b[0] <= x <= b[2] and b[1] <= y <= b[3]]
        assert covering, f"point ({x}, {y}) is in no tile"
    # Minimal: without the last row or column the far edge would not be covered.
    assert grid.bounds[2] >= xmax
    assert grid.bounds[1] <= ymin
    assert grid.bounds[2] - grid.stride_ground < xmax or grid.n_cols == 1
    assert grid.bounds[1] + grid.stride_ground > ymin or grid.n_rows == 1


def test_tile_bounds_start_top_left():
    grid = make_grid(1000.0, 600.0, gsd=2.0, tile_size_px=100, overlap_fraction=0.5)
    assert grid.origin_x == 500.0
    assert grid.origin_y == 2600.0
    assert grid.tile_ground_size == 200.0
    assert grid.stride_ground == 100.0
    assert grid.tile_bounds(0, 0) == (500.0, 2400.0, 700.0, 2600.0)
    assert grid.tile_bounds(1, 2) == (700.0, 2300.0, 900.0, 2500.0)
    assert (grid.n_rows, grid.n_cols) == (5, 9)
    assert grid.tile_count == 45


def test_tile_bounds_outside_grid_raises():
    grid = make_grid()
    with pytest.raises(GridError, match=r"tile \(6, 0\) is outside"):
        grid.tile_bounds(grid.n_rows, 0)
    with pytest.raises(GridError, match=r"tile \(0, -1\)"):
        grid.tile_bounds(0, -1)


def test_tile_ids_lazy_row_major():
    grid = make_grid()
    ids = grid.tile_ids()
    assert iter(ids) is ids
    assert next(ids) == (0, 0)
    assert next(ids) == (0, 1)
    all_ids = list(grid.tile_ids())
    assert len(all_ids) == grid.tile_count
    assert all_ids == sorted(all_ids)


def test_tile_ids_huge_grid_not_materialised():
    grid = TileGrid(CRS_WKT, 0.0, 0.0, 1.0, 224, 224, 100_000, 100_000)
    assert grid.tile_count == 10_000_000_000
    assert next(itertools.islice(grid.tile_ids(), 5, None)) == (0, 5)


@pytest.mark.parametrize(
    ("tile_size_px", "overlap_fraction", "overlap_px", "expected"),
    [
        (224, None, None, 224),
        (224, 0.0, None, 224),
        (224, 0.5, None, 112),
        (224, 0.25, None, 168),
        (224, None, 24, 200),
        (224, None, 223, 1),
        (3, 1 / 3, None, 2),
    ],
)
def test_stride_from_overlap(tile_size_px, overlap_fraction, overlap_px, expected):
    assert stride_from_overlap(tile_size_px, overlap_fraction, overlap_px) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size_px": 224, "overlap_fraction": 1.0}, r"overlap_fraction 1\.0 is out of range"),
        ({"tile_size_px": 224, "overlap_fraction": -0.1}, r"overlap_fraction -0\.1 is out of range"),
        ({"tile_size_px": 224, "overlap_fraction": math.nan}, r"overlap_fraction nan"),
        ({"tile_size_px": 224, "overlap_px": 224}, r"overlap_px 224 is out of range.*< tile_size_px \(224\)"),
        ({"tile_size_px": 224, "overlap_px": -1}, r"overlap_px -1 is out of range"),
        ({"tile_size_px": 224, "overlap_px": 2.5}, r"overlap_px 2\.5 is invalid"),
        ({"tile_size_px": 224, "overlap_fraction": 0.5, "overlap_px": 10}, r"pass only one"),
        ({"tile_size_px": 0}, r"tile_size_px 0 is invalid"),
        ({"tile_size_px": 10, "overlap_fraction": 0.99}, r"stride of 0 px"),
    ],
)
def test_stride_from_overlap_rejects(kwargs, message):
    with pytest.raises(GridError, match=message):
        stride_from_overlap(**kwargs)


@pytest.mark.parametrize(
    ("bounds", "gsd", "tile_size_px", "message"),
    [
        ((0, 0, 100, 100), 0.0, 224, r"gsd 0\.0 is invalid"),
        ((0, 0, 100, 100), -1.0, 224, r"gsd -1\.0 is invalid"),
        ((0, 0, 100, 100), math.inf, 224, r"gsd inf is invalid"),
        ((0, 0, 100, 100), 1.0, 0, r"tile_size_px 0 is invalid"),
        ((0, 0, 100, 100), 1.0, 22.5, r"tile_size_px 22\.5 is invalid"),
        ((0, 0, 0, 100), 1.0, 224, r"bounds \(0, 0, 0, 100\) are empty or inverted"),
        ((0, 100, 100, 0), 1.0, 224, r"are empty or inverted"),
        ((0, 0, 100), 1.0, 224, r"must have 4 values"),
        ((0, 0, math.nan, 100), 1.0, 224, r"non-finite"),
    ],
)
def test_covering_rejects_invalid_parameters(bounds, gsd, tile_size_px, message):
    with pytest.raises(GridError, match=message):
        TileGrid.covering(bounds, CRS_WKT, gsd, tile_size_px)


def test_constructor_validates_fields():
    with pytest.raises(GridError, match=r"stride_px 0 is invalid"):
        TileGrid(CRS_WKT, 0.0, 0.0, 1.0, 224, 0, 1, 1)
    with pytest.raises(GridError, match=r"n_rows 0 is invalid"):
        TileGrid(CRS_WKT, 0.0, 0.0, 1.0, 224, 224, 0, 1)
    with pytest.raises(GridError, match=r"crs_wkt is empty"):
        TileGrid("", 0.0, 0.0, 1.0, 224, 224, 1, 1)


def test_gsd_helpers():
    assert gsd_from_tile_ground_size(448.0, 224) == 2.0
    # 112 source pixels of 0.3 m squeezed into 224 encoder pixels: 0.15 m per encoder pixel.
    assert gsd_from_source_pixels(112, 0.3, 224) == pytest.approx(0.15)
    assert gsd_from_source_pixels(224, 5.0, 224) == pytest.approx(5.0)
    with pytest.raises(GridError, match=r"tile_ground_size -5\.0 is invalid"):
        gsd_from_tile_ground_size(-5.0, 224)
    with pytest.raises(GridError, match=r"source_pixel_size 0\.0 is invalid"):
        gsd_from_source_pixels(224, 0.0, 224)
    with pytest.raises(GridError, match=r"tile_size_source_px 0 is invalid"):
        gsd_from_source_pixels(0, 1.0, 224)


def brute_force_overlapping(grid: TileGrid, bounds) -> list:
    xmin, ymin, xmax, ymax = bounds
    result = []
    for row, col in grid.tile_ids():
        txmin, tymin, txmax, tymax = grid.tile_bounds(row, col)
        if txmin < xmax and txmax > xmin and tymin < ymax and tymax > ymin:
            result.append((row, col))
    return result


@pytest.mark.parametrize("overlap_fraction", [0.0, 0.5, 0.75])
def test_tiles_intersecting_matches_brute_force(overlap_fraction):
    grid = make_grid(1000.0, 600.0, gsd=1.0, tile_size_px=100, overlap_fraction=overlap_fraction)
    queries = [
        (510.0, 2010.0, 520.0, 2020.0),
        (600.0, 2400.0, 800.0, 2500.0),  # edges exactly on tile boundaries
        (0.0, 0.0, 10_000.0, 10_000.0),  # larger than the grid
        (1490.0, 2590.0, 1700.0, 2700.0),  # partly outside
        (3000.0, 3000.0, 3100.0, 3100.0),  # fully outside
        (650.5, 2333.3, 650.6, 2333.4),
    ]
    for query in queries:
        assert list(grid.tiles_intersecting(query)) == brute_force_overlapping(grid, query), query


def test_tiles_intersecting_polygons_triangle():
    grid = make_grid(1000.0, 600.0, gsd=1.0, tile_size_px=100)
    triangle = "POLYGON ((500 2000, 1500 2000, 500 2600, 500 2000))"
    selected = grid.tiles_intersecting_polygons([triangle])
    geometry = ogr.CreateGeometryFromWkt(triangle)
    expected = []
    for row, col in grid.tile_ids():
        tile = ogr.CreateGeometryFromWkt(box_wkt(*grid.tile_bounds(row, col)))
        if geometry.Intersection(tile).GetArea() > 0:
            expected.append((row, col))
    assert selected == expected
    assert 0 < len(selected) < grid.tile_count
    # The top-right tile is outside the triangle.
    assert (0, grid.n_cols - 1) not in selected


def test_tiles_intersecting_polygons_union_and_outside():
    grid = make_grid(1000.0, 600.0, gsd=1.0, tile_size_px=100)
    first = box_wkt(510, 2510, 520, 2520)  # inside tile (0, 0)
    second = "MULTIPOLYGON (((1410 2010, 1420 2010, 1420 2020, 1410 2010)))"  # inside the last tile
    assert grid.tiles_intersecting_polygons([first, second]) == [(0, 0), (5, 9)]
    assert grid.tiles_intersecting_polygons(first) == [(0, 0)]
    assert grid.tiles_intersecting_polygons([box_wkt(5000, 5000, 5100, 5100)]) == []


def test_tiles_intersecting_figure_eight_keeps_both_lobes():
    # Grid x 500 to 1500, y 2000 to 2600. The edges cross at (1000, 2300): a left and a right triangle.
    grid = make_grid(1000.0, 600.0, gsd=1.0, tile_size_px=100)
    figure_eight = "POLYGON ((550 2050, 1450 2550, 1450 2050, 550 2550, 550 2050))"

    selected = grid.tiles_intersecting_polygons([figure_eight])

    columns = {col for _row, col in selected}
    assert min(columns) == 0
    assert max(columns) == grid.n_cols - 1


def test_tiles_intersecting_polygons_rejects_bad_wkt():
    grid = make_grid()
    with pytest.raises(GridError, match=r"'POLYGON \(\(oops\)\)' is not valid WKT"):
        grid.tiles_intersecting_polygons(["POLYGON ((oops))"])
    with pytest.raises(GridError, match=r"is a POINT; pass a POLYGON"):
        grid.tiles_intersecting_polygons(["POINT (1 2)"])


def test_tiles_outside_mask_threshold():
    grid = make_grid(400.0, 100.0, gsd=1.0, tile_size_px=100)  # one row of four tiles
    assert (grid.n_rows, grid.n_cols) == (1, 4)
    # Covers all of tile 0, 75 % of tile 1, exactly 50 % of tile 2 and nothing of tile 3.
    mask = [box_wkt(500, 2000, 650, 2100), box_wkt(640, 2000, 675, 2100), box_wkt(700, 2000, 750, 2100)]
    kept = list(grid.tiles_outside_mask(grid.tile_ids(), mask))
    assert kept == [(0, 2), (0, 3)]
    # Overlapping mask polygons are unioned, so tile 1 is 75 % masked, not 85 %.
    kept_strict = list(grid.tiles_outside_mask(grid.tile_ids(), mask, max_masked_fraction=0.8))
    assert kept_strict == [(0, 1), (0, 2), (0, 3)]
    kept_zero = list(grid.tiles_outside_mask(grid.tile_ids(), mask, max_masked_fraction=0.0))
    assert kept_zero == [(0, 3)]
    assert list(grid.tiles_outside_mask(grid.tile_ids(), [])) == list(grid.tile_ids())
    with pytest.raises(GridError, match=r"max_masked_fraction 1\.5 is out of range"):
        list(grid.tiles_outside_mask(grid.tile_ids(), mask, max_masked_fraction=1.5))


def test_dict_round_trip_through_json():
    grid = make_grid(1000.0, 600.0, gsd=0.3, tile_size_px=224, overlap_fraction=0.25)
    restored = TileGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert restored == grid
    assert restored.tile_bounds(2, 1) == grid.tile_bounds(2, 1)


def test_from_dict_names_missing_keys():
    record = make_grid().to_dict()
    del record["gsd"]
    del record["n_cols"]
    with pytest.raises(GridError, match=r"missing gsd, n_cols"):
        TileGrid.from_dict(record)


def test_covering_real_raster_and_tiny_raster(shared_data):
    def raster_bounds(path):
        dataset = gdal.Open(str(path))
        x0, dx, _, y0, _, dy = dataset.GetGeoTransform()
        bounds = (x0, y0 + dy * dataset.RasterYSize, x0 + dx * dataset.RasterXSize, y0)
        return dataset.GetSpatialRef().ExportToWkt(), bounds

    crs_wkt, bounds = raster_bounds(shared_data / "geo/rasterio/RGB.byte.tif")
    # 791 x 718 pixels of ~300 m, read at 300 m per encoder pixel in 224 px tiles, no overlap.
    grid = TileGrid.covering(bounds, crs_wkt, 300.0, 224)
    assert (grid.n_rows, grid.n_cols) == (4, 4)
    assert grid.tile_bounds(0, 0)[0] == bounds[0]
    assert grid.tile_bounds(0, 0)[3] == bounds[3]
    # A raster of 79 x 71 pixels is smaller than one tile: exactly one tile, overhanging it.
    crs_wkt, bounds = raster_bounds(shared_data / "geo/rasterio/rgb-byte-tenth.tif")
    pixel_size = (bounds[2] - bounds[0]) / 79
    tiny = TileGrid.covering(bounds, crs_wkt, pixel_size, 224)
    assert tiny.tile_count == 1
    assert tiny.tile_bounds(0, 0)[2] > bounds[2]
    assert tiny.tile_bounds(0, 0)[1] < bounds[1]
