"""The ship demo on the shipped RapidEye clip: a box around one ship finds the other three.

Runs the real pipeline with the plugin's default encoder (an EfficientNet-Lite0 under models/,
about 740 tiles, 15-30 s on two CPU cores) through tools/run_demo.py, so the demo's tile size,
overlap and query box are what is tested.
"""

import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import run_demo
from osgeo import gdal, osr
from qgis.core import QgsVectorLayer
from qgis.PyQt.QtGui import QImage

from lookalike.core.encoder import default_model_path
from lookalike.core.lock import index_lock
from lookalike.core.pipeline import BuildParameters, build_index, run_search

# run_demo is tools/run_demo.py; tests/conftest.py puts tools/ on sys.path.

# The clip's geotransform: top-left corner (557050, 4176460) in EPSG:32610, 5 m square pixels.
CLIP_ORIGIN_X_M = 557050.0
CLIP_ORIGIN_Y_M = 4176460.0
CLIP_PIXEL_SIZE_M = 5.0

# Ships measured by hand on the clip: pixels whose mean of R, G and B exceeds 120 (open water
# is 40-90) were grouped into 8-connected components with scipy.ndimage.label, which gave
# exactly four components of 270-335 pixels. Centroid = mean (col + 0.5, row + 0.5) of a
# component; span = its first and last column and row. Checked by eye on a PNG rendering.
SHIPS = {
    # name: (centroid col, centroid row, (first col, last col, first row, last row))
    "north-west": (135.3, 47.1, (128, 141, 25, 68)),
    "north-centre": (308.3, 70.2, (300, 316, 53, 86)),
    "north-east": (446.0, 87.1, (437, 454, 71, 103)),
    "south": (364.7, 307.0, (355, 373, 286, 327)),
}
# A drawn box leaves some water around the ship.
QUERY_MARGIN_PX = 4
TOP_K = 5


def pixel_to_map(col: float, row: float) -> tuple:
    return CLIP_ORIGIN_X_M + col * CLIP_PIXEL_SIZE_M, CLIP_ORIGIN_Y_M - row * CLIP_PIXEL_SIZE_M


def ship_centre_m(name: str) -> tuple:
    col, row, _ = SHIPS[name]
    return pixel_to_map(col, row)


def query_box_m(name: str) -> tuple:
    first_col, last_col, first_row, last_row = SHIPS[name][2]
    xmin, ymax = pixel_to_map(first_col - QUERY_MARGIN_PX, first_row - QUERY_MARGIN_PX)
    xmax, ymin = pixel_to_map(last_col + 1 + QUERY_MARGIN_PX, last_row + 1 + QUERY_MARGIN_PX)
    return xmin, ymin, xmax, ymax


def rank_of_ship(matches, name: str):
    """Return the rank of the first match whose footprint contains the ship's centroid."""
    x, y = ship_centre_m(name)
    for match in matches:
        xmin, ymin, xmax, ymax = match.bounds
        if xmin <= x <= xmax and ymin <= y <= ymax:
            return match.rank
    return None


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    if not default_model_path().is_file():
        pytest.skip(f"the bundled encoder {default_model_path()} is missing")
    output_folder = tmp_path_factory.mktemp("demo")
    assert run_demo.main(["--output-folder", str(output_folder)]) == 0
    return output_folder


def test_measured_ships_match_demo_constants():
    for name, demo_name in (("north-west", "north-west"), ("north-centre", "north-centre"),
                            ("north-east", "north-east (red hull)"), ("south", "south")):
        assert run_demo.SHIP_CENTRES_M[demo_name] == pytest.approx(ship_centre_m(name), abs=1.0)
    assert query_box_m("north-west") == pytest.approx(run_demo.DEMO_QUERY_BOUNDS_M)


@pytest.mark.parametrize("query_ship", sorted(SHIPS))
def test_box_around_one_ship_finds_the_others(demo_output, query_ship):
    matches = run_search(
        demo_output / run_demo.INDEX_FOLDER_NAME,
        run_demo.SAMPLE_RASTER,
        [query_box_m(query_ship)],
        k=TOP_K,
        crs_wkt=run_demo.SAMPLE_CRS,
    )

    assert len(matches) == TOP_K
    assert rank_of_ship(matches, query_ship) is None
    for other_ship in sorted(set(SHIPS) - {query_ship}):
        rank = rank_of_ship(matches, other_ship)
        assert rank is not None, f"{other_ship} ship not in the top {TOP_K} for a query on the {query_ship} ship"


def test_demo_writes_geopackage_and_map(demo_output):
    matches_path = demo_output / run_demo.MATCHES_FILE_NAME
    layer = QgsVectorLayer(f"{matches_path}|layername=Lookalike matches", "matches", "ogr")

    assert layer.isValid()
    assert layer.featureCount() == run_demo.DEMO_K
    assert layer.crs().authid() == "EPSG:32610"
    ranks = sorted(feature["rank"] for feature in layer.getFeatures())
    assert ranks == list(range(1, run_demo.DEMO_K + 1))
    image = QImage(str(demo_output / run_demo.MAP_FILE_NAME))
    assert not image.isNull()
    assert image.width() > 0
    recorded = json.loads((demo_output / run_demo.RECORD_FILE_NAME).read_text(encoding="utf-8"))
    assert set(recorded) == {run_demo.MATCHES_FILE_NAME, run_demo.MAP_FILE_NAME, run_demo.INDEX_FOLDER_NAME}
    assert recorded[run_demo.INDEX_FOLDER_NAME] == run_demo.folder_checksums(demo_output / run_demo.INDEX_FOLDER_NAME)


def test_demo_keeps_a_users_file(tmp_path):
    user_file = tmp_path / run_demo.MATCHES_FILE_NAME
    user_file.write_bytes(b"analyst's own results")

    with pytest.raises(SystemExit, match="--overwrite"):
        run_demo.main(["--output-folder", str(tmp_path)])

    assert user_file.read_bytes() == b"analyst's own results"
    assert not (tmp_path / run_demo.INDEX_FOLDER_NAME).exists()


# -- what the demo may replace ----------------------------------------------------------------------
#
# These runs index with the tiny test encoder, which takes about a second, because they test which
# outputs the demo replaces and not what it finds.

TINY_ENCODER = Path(__file__).resolve().parent.parent / "data" / "tiny_encoder.onnx"


def folder_contents(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def make_users_index(index_folder: Path, raster_folder: Path) -> dict:
    """Index a 96 x 96 px noise raster other than the demo's into ``index_folder`` and return its files."""
    raster_path = raster_folder / "field.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(raster_path), 96, 96, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0))
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(32610)
    dataset.SetProjection(spatial_ref.ExportToWkt())
    generator = np.random.default_rng(0)
    for band_index in range(1, 4):
        dataset.GetRasterBand(band_index).WriteArray(generator.integers(0, 255, size=(96, 96), dtype=np.uint8))
    dataset = None
    build_index(BuildParameters(source_paths=(str(raster_path),), index_folder=str(index_folder),
                                encoder_path=str(TINY_ENCODER), tile_size_source_px=32))
    return folder_contents(index_folder)


def run_tiny_demo(output_folder: Path, *extra_arguments: str) -> int:
    return run_demo.main(["--output-folder", str(output_folder), "--encoder", str(TINY_ENCODER), *extra_arguments])


def test_demo_keeps_a_users_index(tmp_path):
    users_index = make_users_index(tmp_path / run_demo.INDEX_FOLDER_NAME, tmp_path)

    with pytest.raises(SystemExit, match=f"{run_demo.INDEX_FOLDER_NAME} exists.*--overwrite"):
        run_tiny_demo(tmp_path)

    assert folder_contents(tmp_path / run_demo.INDEX_FOLDER_NAME) == users_index
    assert not (tmp_path / run_demo.RECORD_FILE_NAME).exists()


def test_demo_keeps_a_users_index_and_record(tmp_path):
    users_index = make_users_index(tmp_path / run_demo.INDEX_FOLDER_NAME, tmp_path)
    record_path = tmp_path / run_demo.RECORD_FILE_NAME
    record_path.write_text('{"field index": "built on Monday"}', encoding="utf-8")

    with pytest.raises(SystemExit, match=f"{run_demo.RECORD_FILE_NAME} exists.*--overwrite"):
        run_tiny_demo(tmp_path)

    assert folder_contents(tmp_path / run_demo.INDEX_FOLDER_NAME) == users_index
    assert record_path.read_text(encoding="utf-8") == '{"field index": "built on Monday"}'


@pytest.mark.parametrize("content", ['{"field index": "built on Monday"}', "my notes", '{"matches.gpkg": "abc"}'])
def test_demo_keeps_a_users_record(tmp_path, content):
    record_path = tmp_path / run_demo.RECORD_FILE_NAME
    record_path.write_text(content, encoding="utf-8")

    with pytest.raises(SystemExit, match=f"{run_demo.RECORD_FILE_NAME} exists.*--overwrite"):
        run_tiny_demo(tmp_path)

    assert record_path.read_text(encoding="utf-8") == content
    assert not (tmp_path / run_demo.INDEX_FOLDER_NAME).exists()


def test_demo_keeps_an_index_replaced_since(tmp_path):
    assert run_tiny_demo(tmp_path) == 0
    index_folder = tmp_path / run_demo.INDEX_FOLDER_NAME
    for path in index_folder.iterdir():
        path.unlink()
    users_index = make_users_index(index_folder, tmp_path)

    with pytest.raises(SystemExit, match=f"{run_demo.INDEX_FOLDER_NAME} exists.*--overwrite"):
        run_tiny_demo(tmp_path)

    assert folder_contents(index_folder) == users_index


def test_demo_runs_twice_without_overwrite(tmp_path):
    assert run_tiny_demo(tmp_path) == 0
    first_manifest = (tmp_path / run_demo.INDEX_FOLDER_NAME / "manifest.json").read_bytes()

    assert run_tiny_demo(tmp_path) == 0

    index_folder = tmp_path / run_demo.INDEX_FOLDER_NAME
    assert (index_folder / "manifest.json").read_bytes() != first_manifest
    recorded = json.loads((tmp_path / run_demo.RECORD_FILE_NAME).read_text(encoding="utf-8"))
    assert recorded[run_demo.INDEX_FOLDER_NAME] == run_demo.folder_checksums(index_folder)
    assert recorded[run_demo.MATCHES_FILE_NAME] == run_demo.file_sha256(tmp_path / run_demo.MATCHES_FILE_NAME)
    assert recorded[run_demo.MAP_FILE_NAME] == run_demo.file_sha256(tmp_path / run_demo.MAP_FILE_NAME)


def test_overwrite_replaces_users_index_and_record(tmp_path):
    make_users_index(tmp_path / run_demo.INDEX_FOLDER_NAME, tmp_path)
    record_path = tmp_path / run_demo.RECORD_FILE_NAME
    record_path.write_text('{"field index": "built on Monday"}', encoding="utf-8")

    assert run_tiny_demo(tmp_path, "--overwrite") == 0

    index_folder = tmp_path / run_demo.INDEX_FOLDER_NAME
    manifest = json.loads((index_folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["build_parameters"]["source_paths"] == [str(run_demo.SAMPLE_RASTER)]
    recorded = json.loads(record_path.read_text(encoding="utf-8"))
    assert recorded[run_demo.INDEX_FOLDER_NAME] == run_demo.folder_checksums(index_folder)


def test_overwrite_keeps_non_index_folder(tmp_path):
    notes = tmp_path / run_demo.INDEX_FOLDER_NAME / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("field notes", encoding="utf-8")

    with pytest.raises(SystemExit, match=f"{run_demo.INDEX_FOLDER_NAME} is neither empty nor a Lookalike index"):
        run_tiny_demo(tmp_path, "--overwrite")

    assert notes.read_text(encoding="utf-8") == "field notes"


# -- argument checks --------------------------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "expected_message"), [
    (["--k", "0"], "argument --k: 0 is out of range; pass the number of matches, at least 1"),
    (["--k", "-3"], "argument --k: -3 is out of range; pass the number of matches, at least 1"),
    (["--k", "five"], "argument --k: 'five' is not a whole number; pass the number of matches, at least 1"),
    (["--encoder", "missing.onnx"], "--encoder missing.onnx not found; pass an ONNX encoder file"),
    (["--encoder", __file__], f"--encoder {__file__} cannot be used: "),
])
def test_invalid_argument_stops_before_indexing(tmp_path, capsys, arguments, expected_message):
    output_folder = tmp_path / "output"

    with pytest.raises(SystemExit) as raised:
        run_demo.main(["--output-folder", str(output_folder), *arguments])

    assert raised.value.code == 2
    assert expected_message in capsys.readouterr().err
    assert not output_folder.exists()


def test_demo_rejects_file_as_output_folder(tmp_path, capsys):
    output_file = tmp_path / "output"
    output_file.write_text("not a folder", encoding="utf-8")

    with pytest.raises(SystemExit) as raised:
        run_demo.main(["--output-folder", str(output_file)])

    assert raised.value.code == 2
    assert f"--output-folder {output_file} is not a folder; pass a folder path" in capsys.readouterr().err
    assert output_file.read_text(encoding="utf-8") == "not a folder"


def test_demo_rejects_empty_output_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as raised:
        run_demo.main(["--output-folder", ""])

    assert raised.value.code == 2
    assert "argument --output-folder: the folder name is missing" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("make_folder", "expected_message"), [
    (lambda tmp_path: tmp_path / ("a" * 300), "cannot be used (File name too long)"),
    (lambda tmp_path: tmp_path / "notes.txt" / "output", "which is a file; pass a folder path"),
    (lambda tmp_path: Path("/proc/lookalike-demo"), "cannot be created ("),
    (lambda tmp_path: tmp_path / "new" / ("b" * 300), "cannot be created (File name too long)"),
])
def test_demo_rejects_unusable_output_folder(tmp_path, capsys, make_folder, expected_message):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")

    with pytest.raises(SystemExit) as raised:
        run_tiny_demo(make_folder(tmp_path))

    assert raised.value.code == 2
    assert expected_message in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_script_takes_relative_folder_from_caller(tmp_path, repo_root):
    # A file at the relative path in the caller's folder, so that the demo stops at once when it
    # looks there, and would run elsewhere if it looked in the repository.
    (tmp_path / "ships_output").write_text("mine", encoding="utf-8")

    finished = subprocess.run(["bash", str(repo_root / "scripts" / "demo.sh"), "--output-folder", "ships_output"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)

    assert finished.returncode == 2
    assert "--output-folder ships_output is not a folder" in finished.stderr


def test_demo_rejects_output_folder_in_an_index(tmp_path, capsys):
    users_index = make_users_index(tmp_path / "field_index", tmp_path)

    with pytest.raises(SystemExit) as raised:
        run_tiny_demo(tmp_path / "field_index")

    assert raised.value.code == 2
    assert f"is inside the Lookalike index folder {tmp_path / 'field_index'}" in capsys.readouterr().err
    assert folder_contents(tmp_path / "field_index") == users_index


def hold_index_lock(index_folder: Path, locked: threading.Event, release: threading.Event) -> None:
    with index_lock(index_folder):
        locked.set()
        release.wait(timeout=60)


def test_demo_reports_plugin_error_in_one_line(tmp_path):
    # The lock is reentrant within a thread, so another thread holds it, as a build in the dock would.
    # build_index then raises IndexLockedError.
    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_index_lock, args=(tmp_path / run_demo.INDEX_FOLDER_NAME, locked, release))
    holder.start()
    try:
        assert locked.wait(timeout=10)
        with pytest.raises(SystemExit) as raised:
            run_tiny_demo(tmp_path)
    finally:
        release.set()
        holder.join()

    message = str(raised.value.code)
    assert message.startswith("The demo failed: ")
    assert str(tmp_path / run_demo.INDEX_FOLDER_NAME) in message
    assert "\n" not in message


# -- records written by earlier demos ----------------------------------------------------------------


def write_earlier_record(output_folder: Path) -> dict:
    """Rewrite the record as demos before the index was recorded wrote it: the two files only."""
    record_path = output_folder / run_demo.RECORD_FILE_NAME
    recorded = json.loads(record_path.read_text(encoding="utf-8"))
    earlier = {name: recorded[name] for name in run_demo.OUTPUT_FILE_NAMES}
    record_path.write_text(json.dumps(earlier, indent=2), encoding="utf-8")
    return earlier


@pytest.mark.parametrize("source_path_moved", [False, True])
def test_demo_upgrades_earlier_record(tmp_path, source_path_moved):
    assert run_tiny_demo(tmp_path) == 0
    write_earlier_record(tmp_path)
    index_folder = tmp_path / run_demo.INDEX_FOLDER_NAME
    if source_path_moved:
        # An earlier demo run from another checkout recorded the sample raster under its path there.
        manifest_path = index_folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["sources"][0]["path"] = str(tmp_path / "old_checkout" / run_demo.SAMPLE_RASTER.name)
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    assert run_tiny_demo(tmp_path) == 0

    recorded = json.loads((tmp_path / run_demo.RECORD_FILE_NAME).read_text(encoding="utf-8"))
    assert recorded[run_demo.INDEX_FOLDER_NAME] == run_demo.folder_checksums(index_folder)
    manifest = json.loads((index_folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sources"][0]["path"] == str(run_demo.SAMPLE_RASTER)


@pytest.mark.parametrize("with_sample_raster", [False, True])
def test_demo_keeps_users_index_with_earlier_record(tmp_path, with_sample_raster):
    assert run_tiny_demo(tmp_path) == 0
    earlier = write_earlier_record(tmp_path)
    index_folder = tmp_path / run_demo.INDEX_FOLDER_NAME
    for path in index_folder.iterdir():
        path.unlink()
    if with_sample_raster:
        make_users_index(tmp_path / "scratch_index", tmp_path)
        build_index(BuildParameters(
            source_paths=(str(run_demo.SAMPLE_RASTER), str(tmp_path / "field.tif")), index_folder=str(index_folder),
            encoder_path=str(TINY_ENCODER), tile_size_source_px=32,
        ))
        users_index = folder_contents(index_folder)
    else:
        users_index = make_users_index(index_folder, tmp_path)

    with pytest.raises(SystemExit, match=f"{run_demo.INDEX_FOLDER_NAME} exists.*--overwrite"):
        run_tiny_demo(tmp_path)

    assert folder_contents(index_folder) == users_index
    assert json.loads((tmp_path / run_demo.RECORD_FILE_NAME).read_text(encoding="utf-8")) == earlier


@pytest.mark.parametrize(("umask", "expected_mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_demo_record_mode_follows_umask(tmp_path, umask, expected_mode):
    previous_umask = os.umask(umask)
    try:
        assert run_tiny_demo(tmp_path) == 0
    finally:
        os.umask(previous_umask)

    assert (tmp_path / run_demo.RECORD_FILE_NAME).stat().st_mode & 0o777 == expected_mode
