"""Build and query guards: tile sizes, empty builds, foreign folders, locking, duplicate sources."""

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from osgeo import gdal, osr

from lookalike.core import lock as lock_module
from lookalike.core.encoder import OnnxEncoder
from lookalike.core.errors import LookalikeError, SearchError, SearchIndexError
from lookalike.core.index import TileIndex
from lookalike.core.lock import index_lock
from lookalike.core.pipeline import (
    MIN_TILE_SIZE_SOURCE_PX,
    BuildParameters,
    Region,
    build_index,
    embed_query,
    partial_folder_for,
    run_search,
)
from lookalike.core.raster import RasterSource

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_ENCODER = REPO_ROOT / "tests" / "data" / "tiny_encoder.onnx"


def geo(shared_data: Path, relative: str) -> str:
    return str(shared_data / "geo" / relative)


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


# -- tile size and tile count


def test_default_tile_falls_back_on_coarse_raster(shared_data, tmp_path, caplog):
    source = geo(shared_data, "rasterio/rgb-byte-tenth.tif")
    # The bundled encoder suggests 112 m tiles; this raster has ~3 km pixels.
    params = BuildParameters(source_paths=(source,), index_folder=str(tmp_path / "index"))

    with caplog.at_level(logging.WARNING, logger="lookalike"):
        report = build_index(params)

    assert report.tiles_total < 100
    assert report.tiles_embedded >= 1
    assert any("source pixels" in warning for warning in report.warnings)
    assert any("source pixels" in record.getMessage() for record in caplog.records)


def test_explicit_subpixel_tile_is_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")

    with pytest.raises(LookalikeError, match=r"tile_size_source_px 1 .*8"):
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=1))
    assert not (tmp_path / "index").exists()
    assert MIN_TILE_SIZE_SOURCE_PX == 8


def test_explicit_tiny_ground_size_is_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")

    # RGB.byte.tif has ~300 m pixels, so 100 m tiles are a third of a pixel.
    with pytest.raises(LookalikeError, match="tile_ground_size_m 100"):
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=100.0))


def test_tile_count_beyond_pixels_is_rejected(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")

    # 8 px tiles at 90 % overlap advance less than one source pixel per tile.
    with pytest.raises(LookalikeError, match=r"\d+ tiles"):
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=8, overlap_fraction=0.9))
    assert not partial_folder_for(tmp_path / "index").exists()


def test_absolute_tile_cap_can_be_lifted(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")

    with pytest.raises(LookalikeError, match="max_tile_count"):
        build_index(parameters([source], tmp_path / "index", max_tile_count=10))
    report = build_index(parameters([source], tmp_path / "index", max_tile_count=10_000))
    assert report.tiles_embedded > 0


# -- builds that embed nothing


def test_build_with_no_embedded_tiles_fails(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    folder = tmp_path / "index"

    # The nodata collar of the rotated scene reaches into every 700 px tile, so with
    # min_valid_fraction=1.0 every tile is skipped as mostly invalid.
    with pytest.raises(LookalikeError, match="0 tiles embedded") as error:
        build_index(parameters([source], folder, min_valid_fraction=1.0, tile_size_source_px=700))
    assert "mostly nodata or off the raster" in str(error.value)
    assert not (folder / "manifest.json").exists()
    assert not partial_folder_for(folder).exists()


def test_raster_smaller_than_tile_is_indexed(shared_data, tmp_path):
    source = geo(shared_data, "rasterio/rgb-byte-tenth.tif")

    # 79 x 71 px raster in one 200 px tile: about 14 % of the tile is raster.
    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=200))

    assert report.tiles_total == 1
    assert report.tiles_embedded == 1


def test_query_chip_mostly_outside_names_fraction(shared_data, tmp_path):
    source_path = geo(shared_data, "rasterio/RGB.byte.tif")
    build_index(parameters([source_path], tmp_path / "index"))
    index = TileIndex.open(tmp_path / "index")
    encoder = OnnxEncoder(TINY_ENCODER)
    source = RasterSource(source_path)
    # Pixel (row 114, col 766) is image data 3 px inside the east corner of the rotated scene,
    # so the point is on valid pixels while most of the chip around it is nodata collar.
    edge_point = "POINT (331964 2792560)"

    with pytest.raises(SearchError, match=r"\d+ % valid pixels.*threshold of 50 %") as error:
        embed_query(index, encoder, source, edge_point, source.crs_wkt)
    assert "covers no valid pixels" not in str(error.value)


# -- foreign folders and manifests


def make_user_folder(folder: Path, manifest_text: str) -> None:
    (folder / "photos").mkdir(parents=True)
    (folder / "manifest.json").write_text(manifest_text)
    (folder / "thesis.docx").write_bytes(b"thesis")
    (folder / "photos" / "a.jpg").write_bytes(b"jpeg")
    (folder / "graph.000001.hnsw").write_bytes(b"not a graph")


def folder_contents(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("manifest_text", ['{"name": "My App", "icons": []}', "[1, 2, 3]"])
@pytest.mark.parametrize("flags", [{}, {"overwrite_existing_index": True}, {"add_to_existing": True}])
def test_user_folder_is_left_untouched(shared_data, tmp_path, manifest_text, flags):
    folder = tmp_path / "user"
    make_user_folder(folder, manifest_text)
    before = folder_contents(folder)

    with pytest.raises(SearchIndexError, match="not a Lookalike index") as error:
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder, **flags))
    assert "already contains an index" not in str(error.value)
    assert folder_contents(folder) == before


def test_create_rejects_foreign_manifest(tmp_path):
    folder = tmp_path / "user"
    make_user_folder(folder, "[1, 2, 3]")
    encoder = OnnxEncoder(TINY_ENCODER)
    info = {"name": encoder.name, "checksum": encoder.checksum, "embedding_dim": encoder.spec.embedding_dim,
            "spec": {}}

    with pytest.raises(SearchIndexError, match="not a Lookalike index"):
        TileIndex.create(folder, info, overwrite=True)
    assert (folder / "graph.000001.hnsw").read_bytes() == b"not a graph"


# -- locking


@contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[None]:
    """Hold the lock of ``folder`` in another thread for the ``with`` block."""
    acquired = threading.Event()
    release = threading.Event()

    def hold_lock():
        with index_lock(folder):
            acquired.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert acquired.wait(10)
        yield
    finally:
        release.set()
        holder.join()


def test_second_writer_is_rejected_while_locked(shared_data, tmp_path):
    folder = tmp_path / "index"
    with lock_held_elsewhere(folder):
        with pytest.raises(LookalikeError, match="another build is writing") as error:
            build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder))
        assert str(folder) in str(error.value)
    assert build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder)).tiles_embedded > 0


def test_lock_shared_through_symlink(shared_data, tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(folder, target_is_directory=True)
    with lock_held_elsewhere(folder), pytest.raises(LookalikeError, match="another build is writing"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], alias))


def test_unwritable_lock_location_is_named(shared_data, tmp_path):
    # A file where the index's parent folder should be: the lock file cannot be created, as in a
    # folder without write permission (which root, running these tests in CI, would ignore).
    (tmp_path / "reports").write_text("not a folder", encoding="utf-8")
    folder = tmp_path / "reports" / "index"

    with pytest.raises(LookalikeError, match="cannot create the lock file .*index.lock") as error:
        index_lock(folder).__enter__()
    assert "choose an index folder in a place you can write to" in str(error.value)


@pytest.mark.parametrize("flags", [{}, {"add_to_existing": True}])
def test_refused_folder_gets_no_lock_file(shared_data, tmp_path, flags):
    folder = tmp_path / "my documents"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"thesis")

    with pytest.raises(SearchIndexError, match="choose a new or empty folder|contains no index"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder, **flags))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["my documents"]


def test_dangling_symlink_index_rejected(shared_data, tmp_path):
    link = tmp_path / "index"
    link.symlink_to(tmp_path / "missing", target_is_directory=True)

    with pytest.raises(SearchIndexError, match="symbolic link to .*missing, which does not exist"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], link))
    assert not partial_folder_for(link).exists()


def test_current_folder_as_index_rejected(shared_data, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SearchIndexError, match="not empty and contains no Lookalike index"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], "."))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_two_concurrent_builds_one_wins(shared_data, tmp_path):
    folder = tmp_path / "index"
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    outcomes = []

    def build():
        try:
            outcomes.append(build_index(parameters([source], folder, tile_size_source_px=32)))
        except LookalikeError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert len(outcomes) == 2
    assert len(errors) == 1
    assert "another build is writing" in str(errors[0])
    assert TileIndex.open(folder).count > 0


# -- duplicate sources


def test_same_raster_under_two_spellings_is_rejected(shared_data, tmp_path):
    plain = geo(shared_data, "rasterio/RGB.byte.tif")
    detour = geo(shared_data, "rasterio/../rasterio/RGB.byte.tif")

    with pytest.raises(LookalikeError, match="twice"):
        parameters([plain, detour], tmp_path / "index")


def test_copy_of_raster_is_rejected_by_checksum(shared_data, tmp_path):
    plain = geo(shared_data, "rasterio/RGB.byte.tif")
    copy = tmp_path / "copy.tif"
    copy.write_bytes(Path(plain).read_bytes())

    with pytest.raises(LookalikeError, match="same raster"):
        build_index(parameters([plain, str(copy)], tmp_path / "index"))


def test_manifest_keeps_given_abspath(shared_data, tmp_path):
    detour = geo(shared_data, "rasterio/../rasterio/RGB.byte.tif")
    build_index(parameters([detour], tmp_path / "index"))

    assert TileIndex.open(tmp_path / "index").sources[0]["path"] == os.path.abspath(detour)


# -- geographic rasters


def test_global_geographic_raster_is_rejected(shared_data, tmp_path):
    with pytest.raises(LookalikeError, match="gdalwarp -t_srs"):
        build_index(parameters([geo(shared_data, "rasterio/world.rgb.tif")], tmp_path / "index"))


# -- reports, warnings and messages


def test_report_names_band_indexes(shared_data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lookalike"):
        report = build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index"))

    assert report.band_indexes == [(1, 2, 3)]
    assert any("bands [1, 2, 3]" in record.getMessage() for record in caplog.records)


def test_source_without_tiles_gives_warning(shared_data, tmp_path):
    good = geo(shared_data, "rasterio/RGB.byte.tif")
    blank = tmp_path / "blank.tif"
    # A uniform raster without nodata on the same georeferencing: every tile is "blank".
    template = gdal.Open(good)
    dataset = gdal.GetDriverByName("GTiff").Create(str(blank), template.RasterXSize, template.RasterYSize, 3)
    dataset.SetGeoTransform(template.GetGeoTransform())
    dataset.SetProjection(template.GetProjection())
    for band_number in (1, 2, 3):
        dataset.GetRasterBand(band_number).Fill(7)
    dataset = None

    report = build_index(parameters([good, str(blank)], tmp_path / "index"))

    assert report.tiles_embedded > 0
    assert any(str(blank) in warning and "0 tiles" in warning for warning in report.warnings)


def test_run_search_on_file_says_file(shared_data, tmp_path):
    not_a_folder = tmp_path / "index.txt"
    not_a_folder.write_text("x")

    with pytest.raises(SearchIndexError, match="is a file"):
        run_search(not_a_folder, geo(shared_data, "rasterio/RGB.byte.tif"), [(0, 0, 1, 1)])


def test_discarded_checkpoints_log_warning(shared_data, tmp_path, caplog):
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    folder = tmp_path / "index"
    with pytest.raises(LookalikeError):
        build_index(parameters([source], folder), is_cancelled=iter([False, True]).__next__)
    assert partial_folder_for(folder).exists()

    with caplog.at_level(logging.WARNING, logger="lookalike"):
        build_index(parameters([source], folder, overlap_fraction=0.0, discard_other_checkpoints=True))

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert any(str(partial_folder_for(folder)) in record.getMessage() for record in warnings)


def test_foreign_json_manifest_left_alone(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "manifest.json").write_text("[1, 2, 3]", encoding="utf-8")
    (folder / "graph.000001.hnsw").write_bytes(b"not a graph")
    encoder = OnnxEncoder(TINY_ENCODER)
    info = {"name": encoder.name, "checksum": encoder.checksum, "embedding_dim": encoder.spec.embedding_dim,
            "spec": {}}

    with pytest.raises(SearchIndexError, match="not a Lookalike index"):
        TileIndex.create(folder, info, overwrite=True)
    assert (folder / "manifest.json").read_text(encoding="utf-8") == "[1, 2, 3]"


def test_unwritable_index_folder_rejected_before_work(shared_data, tmp_path, monkeypatch):
    folder = tmp_path / "index"
    build_index(parameters([geo(shared_data, "rasterio/rgb1.tif")], folder))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    reads = []
    monkeypatch.setattr(RasterSource, "read_tile", lambda *args, **kwargs: reads.append(1))

    with pytest.raises(SearchIndexError, match="cannot write in .*index.*choose a folder you can write to"):
        build_index(parameters([geo(shared_data, "rasterio/rgb2.tif")], folder, add_to_existing=True))
    assert reads == []


def test_unreadable_manifest_is_named(tmp_path, monkeypatch):
    from lookalike.core.index import index_folder_state

    folder = tmp_path / "index"
    folder.mkdir()
    manifest = folder / "manifest.json"
    manifest.write_text("{}", encoding="utf-8")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(SearchIndexError, match=r"manifest.json cannot be read \(Permission denied\)"):
        index_folder_state(folder)


@pytest.mark.parametrize("overrides", [{"band_indexes": (9, 9, 9)}, {"tile_size_source_px": 2}])
def test_rejected_parameters_leave_no_lock_file(shared_data, tmp_path, overrides):
    folder = tmp_path / "index"

    with pytest.raises(LookalikeError):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder, **overrides))

    assert list(tmp_path.iterdir()) == []


def test_lock_file_beside_an_index_is_kept(shared_data, tmp_path):
    folder = tmp_path / "index"
    build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder))
    lock_file = tmp_path / "index.lock"
    assert lock_file.exists()

    with pytest.raises(SearchIndexError, match="already contains an index"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], folder, tile_size_source_px=96))

    assert lock_file.exists()


def test_file_of_lock_name_not_overwritten(tmp_path):
    notes = tmp_path / "index.lock"
    notes.write_text("lock? ask Maria before changing the survey index\n")

    with pytest.raises(LookalikeError, match="is a file that Lookalike did not write"):
        index_lock(tmp_path / "index").__enter__()

    assert notes.read_text() == "lock? ask Maria before changing the survey index\n"
    with index_lock(tmp_path / "other"):
        pass
    # The file a crashed build left behind is taken over.
    (tmp_path / "crashed.lock").write_text("4242\n")
    with index_lock(tmp_path / "crashed"):
        assert (tmp_path / "crashed.lock").read_text() == f"{os.getpid()}\n"


def test_lock_retaken_after_file_replaced(tmp_path, monkeypatch):
    # Another holder deletes the lock file after this writer opened it and before it locked it:
    # a lock on the deleted file would exclude no other writer, so the writer locks the new file.
    folder = tmp_path / "index"
    lock_file = tmp_path / "index.lock"
    lock_file.write_bytes(b"")
    original_lock = lock_module._lock_file
    calls = []

    def lock_after_replacement(stream):
        calls.append(os.fstat(stream.fileno()).st_ino)
        if len(calls) == 1:
            lock_file.unlink()
            lock_file.write_bytes(b"")
        original_lock(stream)

    monkeypatch.setattr(lock_module, "_lock_file", lock_after_replacement)
    with index_lock(folder):
        assert len(calls) == 2
        assert os.stat(lock_file).st_ino == calls[1]
        assert lock_file.read_text(encoding="ascii").strip() == str(os.getpid())


def write_uniform_raster(path: Path, size_px: int) -> Path:
    """Write a square RGB raster of ``size_px`` 10 m pixels of one colour in UTM zone 10N."""
    raster = gdal.GetDriverByName("GTiff").Create(str(path), size_px, size_px, 3, gdal.GDT_Byte)
    raster.SetGeoTransform((500000.0, 10.0, 0.0, 4100000.0, 0.0, -10.0))
    spatial_reference = osr.SpatialReference()
    spatial_reference.ImportFromEPSG(32610)
    raster.SetProjection(spatial_reference.ExportToWkt())
    for band in range(1, 4):
        raster.GetRasterBand(band).Fill(40 * band)
    raster = None
    return path


def test_one_pixel_raster_gets_tile_advice(tmp_path):
    path = write_uniform_raster(tmp_path / "one_pixel.tif", 1)

    with pytest.raises(LookalikeError, match=r"larger than the raster \(1x1 px\), and its only tiles were skipped as "
                       r"blank; try another tile size") as error:
        build_index(parameters([path], tmp_path / "index"))
    assert "uniform" not in str(error.value)


@pytest.mark.parametrize("data_type", [gdal.GDT_Byte, gdal.GDT_UInt16])
def test_vrt_missing_source_named(repo_root, tmp_path, data_type):
    # Byte rasters are read straight away, others are sampled for their value stretch first.
    part = tmp_path / "part.tif"
    gdal.Translate(str(part), str(repo_root / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif"),
                   srcWin=[0, 0, 200, 200], outputType=data_type)
    mosaic = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(mosaic), [str(part)]).FlushCache()
    part.unlink()

    with pytest.raises(LookalikeError, match=r"part\.tif: No such file or directory") as error:
        build_index(parameters([mosaic], tmp_path / "index"))

    assert "files it refers to" in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mosaic.vrt"]


def test_lock_path_link_never_written_through(shared_data, tmp_path):
    users_file = tmp_path / "my data.txt"
    users_file.write_text("my precious data\n", encoding="utf-8")
    (tmp_path / "index.lock").symlink_to(users_file)

    with pytest.raises(LookalikeError, match=r"index\.lock, where the lock file .* is a symbolic link; remove"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index"))

    assert users_file.read_text(encoding="utf-8") == "my precious data\n"


@pytest.mark.parametrize(("make", "kind"), [("folder", "a folder"), ("pipe", "not a regular file")])
def test_other_file_type_at_lock_path_named(shared_data, tmp_path, make, kind):
    lock_path = tmp_path / "index.lock"
    if make == "folder":
        lock_path.mkdir()
    else:
        os.mkfifo(lock_path)

    with pytest.raises(LookalikeError, match=rf"index\.lock, where the lock file .* is {kind}; remove or rename"):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index"))


def test_rejected_build_into_empty_folder_leaves_no_lock(shared_data, tmp_path):
    # File dialogs let the analyst create the index folder before the build.
    (tmp_path / "index").mkdir()

    with pytest.raises(LookalikeError):
        build_index(parameters([geo(shared_data, "rasterio/RGB.byte.tif")], tmp_path / "index",
                               band_indexes=(9, 9, 9)))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]


def test_small_raster_advised_fitting_tiles(tmp_path):
    # 20 x 20 px of one colour: its only 64 px tile is blank, and smaller tiles would fit inside it.
    path = write_uniform_raster(tmp_path / "small.tif", 20)

    with pytest.raises(LookalikeError, match=r"skipped as blank; use tiles that fit inside it "
                                             r"\(tile_size_source_px from 8 to 20\)"):
        build_index(parameters([path], tmp_path / "index", tile_size_source_px=64))


def test_suggested_minimum_ground_tile_builds(shared_data, tmp_path):
    # 2400 m is just under 8 pixels of this raster's 300.04 m: the suggested minimum must be above it.
    source = geo(shared_data, "rasterio/RGB.byte.tif")
    with pytest.raises(LookalikeError, match=r"is only 7\.99\d source pixels") as error:
        build_index(parameters([source], tmp_path / "index", tile_size_source_px=None, tile_ground_size_m=2400.0))
    suggested_m = float(str(error.value).split("tile_ground_size_m >= ")[1].split(" ")[0])

    raster = RasterSource(source)
    xmin, ymin, xmax, ymax = raster.bounds
    centre_x, centre_y = (xmin + xmax) / 2.0, (ymin + ymax) / 2.0
    centre = Region(crs_wkt=raster.crs_wkt, bounds=(centre_x - 5_000.0, centre_y - 5_000.0,
                                                    centre_x + 5_000.0, centre_y + 5_000.0))
    report = build_index(parameters([source], tmp_path / "index", tile_size_source_px=None,
                                    tile_ground_size_m=suggested_m, extent=centre))

    assert report.tiles_total > 0
