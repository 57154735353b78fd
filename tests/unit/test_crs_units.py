"""Ground sizes in metres against CRS units: feet CRSs, Web Mercator and indexes that mix CRSs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from lookalike.core.crs import TRUE_SCALE_TOLERANCE, grid_scale, metres_per_unit, scale_factor_at
from lookalike.core.encoder import OnnxEncoder
from lookalike.core.errors import LookalikeError
from lookalike.core.grid import TileGrid, gsd_in_units
from lookalike.core.index import TileIndex
from lookalike.core.pipeline import BuildParameters, build_index, embed_query
from lookalike.core.raster import RasterSource

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_ENCODER = REPO_ROOT / "tests" / "data" / "tiny_encoder.onnx"
# RapidEye clip in EPSG:32610 (UTM 10N), 692 x 332 px of 5 m, at about 37.7 degrees north.
SAMPLE_CLIP = REPO_ROOT / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif"
US_SURVEY_FOOT_M = 1200 / 3937
# The bundled encoder suggests tiles of 112 m (0.5 m GSD at 224 px).
BUNDLED_TILE_M = 112.0
# Ground lengths below are measured in UTM 10N, whose scale over the clip is 0.99964. A length
# in UTM metres is thus within 0.05 % of the ground length, and the comparisons allow 0.2 %.
GROUND_REL_TOL = 2e-3


def epsg_wkt(code: int) -> str:
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(code)
    return spatial_ref.ExportToWkt()


def feet_copy(tmp_path: Path, pixel_size_ft: float = 1.64) -> str:
    """Write the sample clip as EPSG:2227 (US survey feet) with ``pixel_size_ft`` pixels, as QA did."""
    path = tmp_path / f"clip_2227_{pixel_size_ft:g}ft.tif"
    dataset = gdal.Open(str(SAMPLE_CLIP))
    left, top = 6_000_000.0, 2_100_000.0
    bounds = [left, top, left + dataset.RasterXSize * pixel_size_ft, top - dataset.RasterYSize * pixel_size_ft]
    gdal.Translate(str(path), dataset, outputSRS="EPSG:2227", outputBounds=bounds)
    return str(path)


def web_mercator_copy(tmp_path: Path) -> str:
    path = tmp_path / "clip_3857.tif"
    gdal.Warp(str(path), str(SAMPLE_CLIP), dstSRS="EPSG:3857")
    return str(path)


def noise_raster(path: Path, epsg: int, bounds, size_px: int = 200) -> str:
    """Write a 3-band Byte raster of random texture over ``bounds`` (xmin, ymin, xmax, ymax)."""
    xmin, ymin, xmax, ymax = bounds
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), size_px, size_px, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((xmin, (xmax - xmin) / size_px, 0.0, ymax, 0.0, -(ymax - ymin) / size_px))
    dataset.SetProjection(epsg_wkt(epsg))
    values = np.random.default_rng(7).integers(0, 256, (3, size_px, size_px), dtype=np.uint8)
    for band in range(3):
        dataset.GetRasterBand(band + 1).WriteArray(values[band])
    dataset = None
    return str(path)


def mercator_bounds(west: float, south: float, east: float, north: float) -> tuple:
    """Return EPSG:3857 bounds of a longitude/latitude box."""
    to_mercator = osr.CoordinateTransformation(wgs84(), reference(3857))
    xmin, ymin, _ = to_mercator.TransformPoint(west, south)
    xmax, ymax, _ = to_mercator.TransformPoint(east, north)
    return xmin, ymin, xmax, ymax


def reference(code: int) -> osr.SpatialReference:
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(code)
    spatial_ref.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return spatial_ref


def wgs84() -> osr.SpatialReference:
    return reference(4326)


def tile_ground_side_m(grid: TileGrid) -> float:
    """Measure tile (0, 0) in UTM 10N metres: the geometric mean of its width and height."""
    spatial_ref = osr.SpatialReference(wkt=grid.crs_wkt)
    spatial_ref.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    to_utm = osr.CoordinateTransformation(spatial_ref, reference(32610))
    xmin, ymin, xmax, ymax = grid.tile_bounds(0, 0)
    x_mid, y_mid = (xmin + xmax) / 2, (ymin + ymax) / 2
    west, east, south, north = to_utm.TransformPoints([(xmin, y_mid), (xmax, y_mid), (x_mid, ymin), (x_mid, ymax)])
    width = math.hypot(east[0] - west[0], east[1] - west[1])
    height = math.hypot(north[0] - south[0], north[1] - south[1])
    return math.sqrt(width * height)


def parameters(sources, index_folder, **overrides) -> BuildParameters:
    values = dict(
        source_paths=tuple(str(path) for path in sources),
        index_folder=str(index_folder),
        encoder_path=str(TINY_ENCODER),
        tile_size_source_px=64,
        overlap_fraction=0.5,
        batch_size=16,
    )
    values.update(overrides)
    return BuildParameters(**values)


def manifest_grids(index_folder: Path) -> list[TileGrid]:
    manifest = json.loads((index_folder / "manifest.json").read_text())
    return [TileGrid.from_dict(source["grid"]) for source in manifest["sources"]]


# -- CRS scale and units


def test_metres_per_unit_of_us_survey_foot():
    assert metres_per_unit(epsg_wkt(2227)) == pytest.approx(US_SURVEY_FOOT_M, rel=1e-12)
    assert metres_per_unit(epsg_wkt(32610)) == 1.0


def test_scale_factor_of_utm_on_central_meridian():
    assert scale_factor_at(epsg_wkt(32610), 500_000.0, 4_176_000.0) == pytest.approx(0.9996, abs=1e-8)


@pytest.mark.parametrize("latitude", [0.0, 37.7, 60.0, 80.0])
def test_scale_factor_of_web_mercator(latitude):
    # EPSG:3857 projects WGS 84 coordinates as if on a sphere of the semi-major axis. On the
    # ellipsoid its scale is thus sqrt(1 - e2 sin^2) / cos along parallels and
    # (1 - e2 sin^2)^1.5 / ((1 - e2) cos) along meridians. The areal scale is their product.
    e2 = 0.00669437999014
    sin, cos = math.sin(math.radians(latitude)), math.cos(math.radians(latitude))
    along_parallel = math.sqrt(1 - e2 * sin**2) / cos
    along_meridian = (1 - e2 * sin**2) ** 1.5 / ((1 - e2) * cos)
    x, y, _ = osr.CoordinateTransformation(wgs84(), reference(3857)).TransformPoint(-122.0, latitude)

    scale = scale_factor_at(epsg_wkt(3857), x, y)

    assert scale == pytest.approx(math.sqrt(along_parallel * along_meridian), rel=1e-6)


def test_equal_area_crs_scale_is_one():
    # EPSG:6933 stretches x and shrinks y away from 30 degrees, but keeps areas.
    assert scale_factor_at(epsg_wkt(6933), 5_000_000.0, 4_000_000.0) == pytest.approx(1.0, abs=1e-6)


def test_engineering_crs_has_no_scale():
    local = osr.SpatialReference()
    local.SetLocalCS("site grid")
    local.SetLinearUnits("metre", 1.0)

    assert scale_factor_at(local.ExportToWkt(), 0.0, 0.0) is None
    assert grid_scale(local.ExportToWkt(), (0.0, 0.0, 10.0, 10.0)).units_per_metre == 1.0


def test_grid_scale_keeps_true_scale_crs_units():
    utm = grid_scale(epsg_wkt(32610), (557_050.0, 4_174_800.0, 560_510.0, 4_176_460.0))
    feet = grid_scale(epsg_wkt(2227), (6_000_000.0, 2_099_455.5, 6_001_134.8, 2_100_000.0))

    assert utm.scale_factor is None
    assert utm.units_per_metre == 1.0
    assert feet.scale_factor is None
    assert feet.units_per_metre == pytest.approx(1 / US_SURVEY_FOOT_M, rel=1e-12)


def test_web_mercator_near_equator_within_tolerance():
    # 1 / cos(latitude) stays below 1.01 up to about 8 degrees, so no scale is applied there.
    bounds = mercator_bounds(10.0, 2.0, 10.1, 2.1)

    scale = grid_scale(epsg_wkt(3857), bounds)

    assert scale.scale_factor is None
    assert scale.units_per_metre == 1.0
    assert 1.0 < scale_factor_at(epsg_wkt(3857), *bounds[:2]) < 1 + TRUE_SCALE_TOLERANCE


def test_grid_scale_of_web_mercator_at_centre():
    bounds = mercator_bounds(-122.4, 37.7, -122.3, 37.8)

    scale = grid_scale(epsg_wkt(3857), bounds)

    centre = ((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    assert scale.scale_factor == scale_factor_at(epsg_wkt(3857), *centre)
    assert scale.units_per_metre == scale.scale_factor
    assert scale.scale_factor == pytest.approx(1 / math.cos(math.radians(37.75)), rel=5e-3)


# -- grid records


def test_grid_gsd_m_in_feet_crs():
    grid = TileGrid.covering((0.0, 0.0, 1000.0, 1000.0), epsg_wkt(2227), gsd=2.0, tile_size_px=224)

    assert grid.gsd_m == pytest.approx(2.0 * US_SURVEY_FOOT_M, rel=1e-12)
    assert grid.tile_ground_size_m == pytest.approx(448.0 * US_SURVEY_FOOT_M, rel=1e-12)


def test_grid_record_keeps_scale_factor():
    bounds = mercator_bounds(-122.4, 37.7, -122.3, 37.8)
    grid = TileGrid.covering(bounds, epsg_wkt(3857), gsd=1.25, tile_size_px=224, scale_factor=1.25)

    restored = TileGrid.from_dict(json.loads(json.dumps(grid.to_dict())))

    assert restored == grid
    assert restored.gsd_m == pytest.approx(1.0)


def test_true_scale_grid_record_has_no_scale_key():
    grid = TileGrid.covering((557_050.0, 4_174_800.0, 560_510.0, 4_176_460.0), epsg_wkt(32610), 0.5, 224)

    assert "scale_factor" not in grid.to_dict()
    assert grid.gsd_m == 0.5


def test_grid_record_without_scale_key_measures_scale():
    # A Web Mercator grid written without the key (by an earlier version) still gets its ground size.
    bounds = mercator_bounds(-122.4, 37.7, -122.3, 37.8)
    record = TileGrid.covering(bounds, epsg_wkt(3857), gsd=1.25, tile_size_px=224).to_dict()

    grid = TileGrid.from_dict(record)

    assert grid.scale_factor is None
    assert grid.gsd_m == pytest.approx(1.25 * math.cos(math.radians(37.75)), rel=5e-3)


def test_invalid_scale_factor_rejected():
    with pytest.raises(LookalikeError, match="scale_factor -1"):
        TileGrid(epsg_wkt(3857), 0.0, 0.0, 1.0, 224, 224, 1, 1, scale_factor=-1.0)


def test_gsd_in_units_is_exact_for_equal_units():
    assert gsd_in_units(0.1 + 0.2, 3.280833333333333, 3.280833333333333) == 0.1 + 0.2
    assert gsd_in_units(1.0, 1.0, 1 / US_SURVEY_FOOT_M) == pytest.approx(1 / US_SURVEY_FOOT_M)


# -- feet CRS


def test_feet_crs_default_tile_is_encoder_metres(tmp_path):
    # 1.64 ft (0.5 m) pixels: the bundled encoder's 112 m tile is 367.45 ft, 224 source pixels.
    source = feet_copy(tmp_path)

    report = build_index(BuildParameters(source_paths=(source,), index_folder=str(tmp_path / "index")))

    grid = report.grids[0]
    assert grid.tile_ground_size == pytest.approx(BUNDLED_TILE_M / US_SURVEY_FOOT_M, rel=1e-9)
    assert grid.tile_ground_size_m == pytest.approx(BUNDLED_TILE_M, rel=1e-9)
    assert report.warnings == []


def test_feet_crs_default_tile_not_raised_to_minimum(tmp_path):
    # 10 ft pixels: 112 m is 36.7 source pixels, above the 32 px minimum; 112 ft would be 11.2.
    source = feet_copy(tmp_path, pixel_size_ft=10.0)

    report = build_index(BuildParameters(source_paths=(source,), index_folder=str(tmp_path / "index")))

    assert report.warnings == []
    assert report.grids[0].tile_ground_size == pytest.approx(BUNDLED_TILE_M / US_SURVEY_FOOT_M, rel=1e-9)


def test_feet_crs_default_tile_warning_in_metres(tmp_path):
    # 100 ft pixels: 112 m is 3.7 source pixels, so the tile is raised to 32 px = 975.4 m.
    source = feet_copy(tmp_path, pixel_size_ft=100.0)

    report = build_index(BuildParameters(source_paths=(source,), index_folder=str(tmp_path / "index")))

    assert report.grids[0].tile_ground_size == pytest.approx(3200.0, rel=1e-9)
    assert len(report.warnings) == 1
    assert "112 m is only 3.67 source pixels" in report.warnings[0]
    assert "(30.48 m per pixel)" in report.warnings[0]
    assert "(975.4 m) instead" in report.warnings[0]


def test_feet_crs_ground_size_in_metres(tmp_path):
    source = feet_copy(tmp_path)

    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=100.0))

    assert report.grids[0].tile_ground_size == pytest.approx(100.0 / US_SURVEY_FOOT_M, rel=1e-9)


def test_feet_crs_small_ground_size_accepted(tmp_path):
    # 5 m is 10 source pixels of 1.64 ft; read as 5 ft it would be 3 pixels and rejected.
    source = feet_copy(tmp_path)

    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=5.0))

    assert report.grids[0].tile_ground_size_m == pytest.approx(5.0, rel=1e-9)


def test_feet_crs_tiny_ground_size_names_metres(tmp_path):
    # 8 source pixels of 1.64 ft (0.4999 m) are 3.999 m, which the message rounds up to the centimetre.
    source = feet_copy(tmp_path)

    expected = r"\(0\.49987\d m per pixel on the ground\); pass tile_ground_size_m >= 4 "
    with pytest.raises(LookalikeError, match=expected) as raised:
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=3.0))
    # The same limit as a GSD, for callers that set the GSD: 4 m over the test encoder's 32 px.
    assert "a GSD of at least 0.125 m per encoder pixel at the encoder's input size of 32 px" in str(raised.value)


def test_feet_and_metre_sources_share_ground_size(tmp_path):
    source = feet_copy(tmp_path)

    report = build_index(parameters([SAMPLE_CLIP, source], tmp_path / "index"))

    utm_grid, feet_grid = manifest_grids(tmp_path / "index")
    # 64 source pixels of 5 m.
    assert utm_grid.tile_ground_size == pytest.approx(320.0)
    assert feet_grid.tile_ground_size == pytest.approx(320.0 / US_SURVEY_FOOT_M, rel=1e-9)
    assert [grid.tile_ground_size_m for grid in report.grids] == pytest.approx([320.0, 320.0], rel=1e-9)


def test_feet_source_added_to_metre_index(tmp_path):
    build_index(parameters([SAMPLE_CLIP], tmp_path / "index"))
    source = feet_copy(tmp_path, pixel_size_ft=5.0)

    build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, add_to_existing=True))

    utm_grid, feet_grid = manifest_grids(tmp_path / "index")
    assert feet_grid.tile_ground_size == pytest.approx(utm_grid.tile_ground_size / US_SURVEY_FOOT_M, rel=1e-9)


def test_other_tile_size_than_index_names_metres(tmp_path):
    build_index(parameters([SAMPLE_CLIP], tmp_path / "index"))
    source = feet_copy(tmp_path, pixel_size_ft=5.0)

    with pytest.raises(LookalikeError, match=r"tiles of 320 m on the ground.*pass tile_ground_size_m=320\."):
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=100.0,
                               add_to_existing=True))


def test_other_tile_size_in_pixels_suggests_pixels(tmp_path):
    build_index(parameters([SAMPLE_CLIP], tmp_path / "index"))
    source = feet_copy(tmp_path, pixel_size_ft=5.0)

    # The index has tiles of 320 m: 210 pixels of 5 US survey feet (1.524 m) each.
    with pytest.raises(LookalikeError, match=r"pass tile_size_source_px=209\.9"):
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=16, add_to_existing=True))


def test_matching_ground_size_accepted_in_feet_crs(tmp_path):
    build_index(parameters([SAMPLE_CLIP], tmp_path / "index"))
    source = feet_copy(tmp_path, pixel_size_ft=5.0)

    build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=320.0,
                           add_to_existing=True))

    assert manifest_grids(tmp_path / "index")[1].tile_ground_size_m == pytest.approx(320.0, rel=1e-9)


# -- Web Mercator


def test_web_mercator_tile_has_ground_size(tmp_path):
    source = web_mercator_copy(tmp_path)

    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=320.0))

    grid = report.grids[0]
    assert tile_ground_side_m(grid) == pytest.approx(320.0, rel=GROUND_REL_TOL)
    assert grid.tile_ground_size_m == pytest.approx(320.0, rel=1e-9)
    assert grid.scale_factor == pytest.approx(1 / math.cos(math.radians(37.73)), rel=5e-3)


@pytest.mark.parametrize("mercator_first", [True, False])
def test_web_mercator_and_utm_share_ground_size(tmp_path, mercator_first):
    mercator = web_mercator_copy(tmp_path)
    sources = [mercator, SAMPLE_CLIP] if mercator_first else [SAMPLE_CLIP, mercator]

    build_index(parameters(sources, tmp_path / "index"))

    first, second = manifest_grids(tmp_path / "index")
    assert tile_ground_side_m(first) == pytest.approx(tile_ground_side_m(second), rel=GROUND_REL_TOL)
    assert first.tile_ground_size_m == pytest.approx(second.tile_ground_size_m, rel=1e-9)


def test_web_mercator_added_to_utm_index(tmp_path):
    build_index(parameters([SAMPLE_CLIP], tmp_path / "index"))
    mercator = web_mercator_copy(tmp_path)

    build_index(parameters([mercator], tmp_path / "index", tile_size_source_px=None, add_to_existing=True))

    utm_grid, mercator_grid = manifest_grids(tmp_path / "index")
    assert tile_ground_side_m(mercator_grid) == pytest.approx(tile_ground_side_m(utm_grid), rel=GROUND_REL_TOL)
    assert mercator_grid.scale_factor is not None


def test_utm_and_geographic_grids_get_no_scale(tmp_path):
    geographic = tmp_path / "clip_4326.tif"
    gdal.Warp(str(geographic), str(SAMPLE_CLIP), dstSRS="EPSG:4326")

    build_index(parameters([SAMPLE_CLIP, geographic], tmp_path / "index"))

    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert ["scale_factor" in source["grid"] for source in manifest["sources"]] == [False, False]


def test_tall_web_mercator_raster_warns(tmp_path):
    # From 30 to 45 degrees north the scale of EPSG:3857 grows by about a fifth.
    source = noise_raster(tmp_path / "tall_3857.tif", 3857, mercator_bounds(-10.0, 30.0, 5.0, 45.0))

    report = build_index(parameters([source], tmp_path / "index"))

    assert any("tiles at its corners cover" in warning for warning in report.warnings)


def test_small_web_mercator_raster_does_not_warn(tmp_path):
    source = web_mercator_copy(tmp_path)

    report = build_index(parameters([source], tmp_path / "index"))

    assert report.warnings == []


# -- queries on rasters in other units


def query_footprint_ground_side_m(footprint, crs_wkt: str) -> float:
    xmin, ymin, xmax, ymax = footprint
    return tile_ground_side_m(TileGrid.covering((xmin, ymin, xmax, ymax), crs_wkt, xmax - xmin, 1))


@pytest.mark.parametrize("copy", [feet_copy, web_mercator_copy])
def test_query_chip_keeps_ground_size(tmp_path, copy):
    build_index(parameters([SAMPLE_CLIP], tmp_path / "index"))
    index = TileIndex.open(tmp_path / "index")
    index_side_m = tile_ground_side_m(TileGrid.from_dict(index.sources[0]["grid"]))
    other = copy(tmp_path)
    source = RasterSource(other)
    centre_x = (source.bounds[0] + source.bounds[2]) / 2
    centre_y = (source.bounds[1] + source.bounds[3]) / 2

    chips = embed_query(index, OnnxEncoder(str(TINY_ENCODER)), source, f"POINT({centre_x} {centre_y})", source.crs_wkt)

    assert len(chips.footprints) == 1
    side_m = query_footprint_ground_side_m(chips.footprints[0], chips.crs_wkt)
    assert side_m == pytest.approx(index_side_m, rel=GROUND_REL_TOL)
