"""End to end through ``scripts/qgis_process.sh``: build, search and export chips as separate processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from osgeo import gdal, ogr

SHIPS_RASTER = Path("geo/planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif")
# Centre of the north-middle ship of SHIPS_RASTER, EPSG:32610.
SHIP_CENTRE = (558585.0, 4176120.0)
QGIS_PROCESS_TIMEOUT_S = 300


def qgis_process(repo_root: Path, home: Path, *arguments: str) -> dict:
    """Run ``scripts/qgis_process.sh --json run ...`` and return its parsed JSON output."""
    environment = dict(os.environ, LOOKALIKE_QGIS_PROCESS_HOME=str(home))
    completed = subprocess.run(
        ["bash", str(repo_root / "scripts" / "qgis_process.sh"), "--json", "run", *arguments],
        capture_output=True, text=True, env=environment, timeout=QGIS_PROCESS_TIMEOUT_S, check=False,
    )
    assert completed.returncode == 0, f"qgis_process failed:\n{completed.stdout}\n{completed.stderr}"
    # The JSON document starts at the first brace; Python warnings may precede it on stdout.
    return json.loads(completed.stdout[completed.stdout.index("{"):])


def qgis_process_failure(repo_root: Path, home: Path, *arguments: str) -> str:
    """Run ``scripts/qgis_process.sh run ...``, expect a non-zero exit status and return stderr."""
    environment = dict(os.environ, LOOKALIKE_QGIS_PROCESS_HOME=str(home))
    completed = subprocess.run(
        ["bash", str(repo_root / "scripts" / "qgis_process.sh"), "run", *arguments],
        capture_output=True, text=True, env=environment, timeout=QGIS_PROCESS_TIMEOUT_S, check=False,
    )
    assert completed.returncode != 0, f"qgis_process succeeded:\n{completed.stdout}"
    return completed.stderr


@pytest.fixture(scope="module")
def qgis_process_available() -> None:
    if shutil.which("qgis_process.bin") is None and not Path("/usr/bin/qgis_process.bin").is_file():
        pytest.skip("qgis_process.bin is not installed")


def test_build_search_export(qgis_process_available, repo_root, shared_data, tmp_path):
    home = tmp_path / "qgis_process_home"
    index_folder = tmp_path / "index"
    tiny_encoder = str(repo_root / "tests" / "data" / "tiny_encoder.onnx")

    built = qgis_process(
        repo_root, home, "lookalike:buildindex", "--",
        f"INPUT_RASTERS={shared_data / SHIPS_RASTER}", f"ENCODER={tiny_encoder}",
        "TILE_SIZE=32", "TILE_SIZE_UNIT=0", f"OUTPUT={index_folder}",
    )
    assert built["results"]["TILES_EMBEDDED"] > 0
    assert (index_folder / "manifest.json").is_file()

    examples = tmp_path / "ship.geojson"
    examples.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32610"}},
        "features": [{"type": "Feature", "properties": {},
                      "geometry": {"type": "Point", "coordinates": list(SHIP_CENTRE)}}],
    }), encoding="utf-8")
    matches_path = tmp_path / "matches.gpkg"
    searched = qgis_process(
        repo_root, home, "lookalike:search", "--",
        f"INDEX={index_folder}", f"POSITIVES={examples}", "K=5", f"OUTPUT={matches_path}",
    )
    assert searched["results"]["MATCH_COUNT"] == 5

    dataset = ogr.Open(str(matches_path))
    layer = dataset.GetLayer(0)
    assert layer.GetFeatureCount() == 5
    definition = layer.GetLayerDefn()
    field_names = [definition.GetFieldDefn(position).GetName() for position in range(definition.GetFieldCount())]
    assert field_names == ["rank", "score", "tile_id", "source", "row", "col", "encoder", "query"]
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "32610"
    ranks = sorted(feature.GetField("rank") for feature in layer)
    assert ranks == [1, 2, 3, 4, 5]
    dataset = None

    chips_folder = tmp_path / "chips"
    exported = qgis_process(
        repo_root, home, "lookalike:exportchips", "--",
        f"INPUT={matches_path}", f"OUTPUT={chips_folder}",
    )
    assert exported["results"]["CHIP_COUNT"] == 5
    with open(chips_folder / "labels.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 5
    for row in rows:
        chip = gdal.Open(str(chips_folder / row["chip"]))
        assert chip is not None, f"{row['chip']} is not readable"
        assert chip.RasterCount == 4
        assert chip.GetSpatialRef().GetAuthorityCode(None) == "32610"


def test_invalid_values_reported_once(qgis_process_available, repo_root, tmp_path):
    home = tmp_path / "qgis_process_home"
    raster = str(repo_root / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif")
    index_folder = tmp_path / "not_an_index"
    index_folder.mkdir()
    examples = tmp_path / "ship.geojson"
    examples.write_text(json.dumps({
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [0, 0]}}],
    }), encoding="utf-8")
    cases = [
        (["lookalike:buildindex", "--", f"INPUT_RASTERS={raster}", "OVERLAP_PERCENT=100",
          f"OUTPUT={tmp_path / 'index'}"], "OVERLAP_PERCENT=100 is out of range"),
        (["lookalike:buildindex", "--", f"INPUT_RASTERS={tmp_path / 'missing.tif'}", f"OUTPUT={tmp_path / 'index'}"],
         f"INPUT_RASTERS: {tmp_path / 'missing.tif'} is neither a layer"),
        (["lookalike:search", "--", f"INDEX={index_folder}", f"POSITIVES={examples}", "K=0",
          f"OUTPUT={tmp_path / 'matches.gpkg'}"], "K=0 is out of range"),
        # Raised by the core while the algorithm runs, not by the parameter check.
        (["lookalike:search", "--", f"INDEX={index_folder}", f"POSITIVES={examples}",
          f"OUTPUT={tmp_path / 'matches.gpkg'}"], "is not a Lookalike index"),
    ]
    for arguments, expected in cases:
        stderr = qgis_process_failure(repo_root, home, *arguments)
        assert "setapi" not in stderr
        assert "Incorrect parameter value" not in stderr
        assert stderr.count(expected) == 1, stderr


def test_build_warning_printed_once(qgis_process_available, repo_root, shared_data, tmp_path):
    # NAIP bands carry no colour interpretation, so the build warns which bands it read.
    home = tmp_path / "qgis_process_home"
    environment = dict(os.environ, LOOKALIKE_QGIS_PROCESS_HOME=str(home))
    raster = shared_data / "geo/naip_timeseries/m_4709963_se_14_1_20200831.tif"
    completed = subprocess.run(
        ["bash", str(repo_root / "scripts" / "qgis_process.sh"), "run", "lookalike:buildindex", "--",
         f"INPUT_RASTERS={raster}", "TILE_SIZE=640", f"OUTPUT={tmp_path / 'index'}"],
        capture_output=True, text=True, env=environment, timeout=QGIS_PROCESS_TIMEOUT_S, check=False,
    )

    assert completed.returncode == 0, completed.stderr
    output = completed.stdout + completed.stderr
    assert output.count("without red, green and blue colour interpretation") == 1, output
