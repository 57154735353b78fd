"""Chip mosaics, tiled VRTs, colour histograms, confusable classes and goal verdicts of the benchmarks."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from lookalike.bench import report
from lookalike.bench.datasets import grid_shape, write_tiled_vrt
from lookalike.bench.retrieval import colour_histograms, confusable_classes, rank_all_others


@pytest.mark.parametrize(
    ("cell_count", "expected"),
    [(3000, (60, 50)), (100, (10, 10)), (300, (20, 15)), (7, (7, 1)), (1, (1, 1))],
)
def test_grid_shape_exact_rectangle(cell_count, expected):
    assert grid_shape(cell_count) == expected


def test_bench_import_leaves_gdal_exceptions_off():
    tools = Path(__file__).resolve().parents[2] / "tools"
    script = (f"import sys; sys.path.insert(0, {str(tools)!r})\n"
              "from devimport import import_lookalike; import_lookalike()\n"
              "from osgeo import gdal\n"
              "import lookalike.bench.datasets\n"
              "print(gdal.GetUseExceptions())\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert completed.stdout.strip().splitlines()[-1] == "0"


def test_bench_gdal_calls_raise_and_restore_setting(tmp_path):
    was_on = gdal.GetUseExceptions()
    gdal.DontUseExceptions()
    try:
        with pytest.raises(RuntimeError):
            write_tiled_vrt(tmp_path / "missing.tif", tmp_path / "mosaic.vrt", 2)
        assert not gdal.GetUseExceptions()
    finally:
        if was_on:
            gdal.UseExceptions()


def test_grid_shape_rejects_zero():
    with pytest.raises(ValueError, match="at least 1"):
        grid_shape(0)


def test_colour_histograms_unit_norm_and_identity():
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    chips[2] = chips[0]
    features = colour_histograms(chips)
    assert features.shape == (3, 3 * 16)
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0)
    assert features[0] @ features[2] == pytest.approx(1.0)


def test_colour_histograms_disjoint_colours_are_orthogonal():
    dark = np.zeros((1, 3, 4, 4), dtype=np.uint8)
    bright = np.full((1, 3, 4, 4), 255, dtype=np.uint8)
    features = colour_histograms(np.concatenate([dark, bright]))
    assert features[0] @ features[1] == pytest.approx(0.0)


def test_rank_all_others_leaves_query_out():
    vectors = np.eye(3, dtype=np.float32)
    vectors[2] = vectors[0]
    rankings = rank_all_others(vectors, 2)
    assert rankings[0][0] == 2
    assert all(query not in ranking for query, ranking in enumerate(rankings))
    assert all(len(ranking) == 2 for ranking in rankings)


def test_confusable_classes_most_frequent_other_label():
    labels = ["a", "a", "b", "c", "c"]
    # Query 0 (a) ranks b once and c twice; query 2 (b) ranks only a.
    rankings = [[3, 2, 4], [0, 2], [0, 1], [4], [3]]
    confusable = confusable_classes(rankings, labels)
    assert confusable["a"] == "c"
    assert confusable["b"] == "a"
    assert "c" not in confusable


def test_write_tiled_vrt_covers_repeats(tmp_path):
    source = tmp_path / "source.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(source), 5, 3, 1, gdal.GDT_Byte)
    dataset.SetGeoTransform((1000.0, 2.0, 0.0, 5000.0, 0.0, -2.0))
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(32633)
    dataset.SetProjection(spatial_ref.ExportToWkt())
    dataset.GetRasterBand(1).WriteArray(np.arange(15, dtype=np.uint8).reshape(3, 5))
    dataset = None

    mosaic = gdal.Open(str(write_tiled_vrt(source, tmp_path / "mosaic" / "mosaic.vrt", 2)))
    assert (mosaic.RasterXSize, mosaic.RasterYSize) == (10, 6)
    assert mosaic.GetGeoTransform() == pytest.approx((1000.0, 2.0, 0.0, 5000.0, 0.0, -2.0))
    pixels = mosaic.ReadAsArray()
    original = np.arange(15, dtype=np.uint8).reshape(3, 5)
    assert np.array_equal(pixels[:3, :5], original)
    assert np.array_equal(pixels[3:, 5:], original)


@pytest.mark.parametrize(("round_ratios", "verdict"), [
    ([0.91, 0.95, 0.93], "yes"),
    ([0.80, 0.83, 0.85], "**no**"),
    ([1.00, 0.70, 0.91], "**unclear**: rounds 0.70 to 1.00 lie on both sides"),
])
def test_throughput_verdict_by_round(round_ratios, verdict):
    assert report._throughput_verdict(round_ratios) == verdict
