"""How the Processing algorithms treat unusual inputs: outputs over inputs, fractional and
out-of-range numbers, examples without geometry, files that are not rasters, examples over
several rasters and missing encoders.

Builds use the tiny test encoder (32 px input, 16-dim output) and small extents, so each takes
seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dock_testing import SAMPLE_CLIP
from osgeo import gdal
from processing_testing import point_layer, polygon_layer, run_algorithm
from qgis.core import (
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant

from lookalike.core.encoder import default_model_path
from lookalike.core.errors import SearchError
from lookalike.core.grid import TileGrid
from lookalike.core.index import TileIndex
from lookalike.processing.search import MAX_K, SearchAlgorithm
from lookalike.processing.support import core_errors

# The north-middle ship of SHIPS_RASTER, and a box around the whole raster (EPSG:32610).
SHIP_CENTRE = (558585.0, 4176120.0)
SHIPS_RASTER_BOX = (556500.0, 4174500.0, 561000.0, 4177000.0)
# A 480 m square over the ship, for builds that need only a few tiles.
SHIP_EXTENT = "558345,558825,4175880,4176360 [EPSG:32610]"
# rgb1.tif and rgb4.tif are the north-west and south-east quadrants of a Landsat scene in UTM 18N.
RASTERIO = Path("geo/rasterio")
RGB_CRS = "EPSG:32618"
POINT_ON_RGB1 = (160000.0, 2770000.0)
POINT_ON_RGB4 = (280000.0, 2660000.0)
QGIS_PROCESS_TIMEOUT_S = 300


class RecordingFeedback(QgsProcessingFeedback):
    """Feedback that keeps the info and warning texts an algorithm pushes."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def pushInfo(self, info: str) -> None:  # noqa: N802 - QGIS API
        self.infos.append(info)
        super().pushInfo(info)

    def pushWarning(self, warning: str) -> None:  # noqa: N802 - QGIS API
        self.warnings.append(warning)
        super().pushWarning(warning)


def run_failure(algorithm_id: str, parameters: dict) -> str:
    """Run an algorithm that must fail and return its message."""
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm(algorithm_id, parameters)
    return str(raised.value)


@pytest.mark.parametrize("algorithm_id", ["buildindex", "search"])
def test_encoder_of_another_extension_checked_by_lookalike(provider, ships_raster, tiny_index, tmp_path, algorithm_id):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not a model", encoding="utf-8")
    parameters = {"ENCODER": str(not_a_model)}
    if algorithm_id == "buildindex":
        parameters.update(INPUT_RASTERS=[ships_raster], OUTPUT=str(tmp_path / "index"))
    else:
        parameters.update(INDEX=tiny_index, POSITIVES=polygon_layer([(558505.0, 4176040.0, 558665.0, 4176200.0)]),
                          OUTPUT=str(tmp_path / "matches.gpkg"))

    message = run_failure(algorithm_id, parameters)

    assert "Incorrect parameter value for ENCODER" not in message
    assert str(not_a_model) in message


def test_file_as_index_names_manifest(provider, tmp_path):
    not_an_index = tmp_path / "README.md"
    not_an_index.write_text("text", encoding="utf-8")

    message = run_failure("indexinfo", {"INDEX": str(not_an_index), "OUTPUT_HTML": str(tmp_path / "info.html")})

    assert f"INDEX: {not_an_index} is a file, but INDEX takes a folder" in message
    assert "the folder that contains manifest.json" in message


@pytest.fixture(scope="module")
def tiny_index(provider, tmp_path_factory, ships_raster: str, tiny_encoder: str) -> str:
    """Index of the whole ships raster built with the tiny encoder: 32 source px tiles, no overlap."""
    folder = tmp_path_factory.mktemp("tiny") / "index"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 32,
        "OUTPUT": str(folder),
    })
    return str(folder)


@pytest.fixture(scope="module")
def two_raster_index(provider, tmp_path_factory, shared_data: Path, tiny_encoder: str) -> str:
    """Index of rgb1.tif and rgb4.tif, which do not overlap, built with the tiny encoder."""
    folder = tmp_path_factory.mktemp("two_rasters") / "index"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(shared_data / RASTERIO / "rgb1.tif"), str(shared_data / RASTERIO / "rgb4.tif")],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 32,
        "OUTPUT": str(folder),
    })
    return str(folder)


def write_geojson(path: Path, geometries: list) -> Path:
    """Write a GeoJSON file in EPSG:32610 with one feature per geometry (None for a null geometry)."""
    path.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32610"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": geometry} for geometry in geometries],
    }), encoding="utf-8")
    return path


def ship_point_geojson(path: Path) -> Path:
    return write_geojson(path, [{"type": "Point", "coordinates": list(SHIP_CENTRE)}])


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# -- outputs over inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("example_parameter", ["POSITIVES", "NEGATIVES"])
def test_search_rejects_output_over_examples(tiny_index, tiny_encoder, tmp_path, example_parameter):
    examples = ship_point_geojson(tmp_path / "examples.geojson")
    before = examples.read_bytes()
    parameters = {
        "INDEX": tiny_index,
        "POSITIVES": point_layer([SHIP_CENTRE]),
        "ENCODER": tiny_encoder,
        example_parameter: str(examples),
        "OUTPUT": str(examples),
    }

    message = run_failure("search", parameters)

    assert f"OUTPUT: {examples} is the file of {example_parameter}" in message
    assert "Choose another output file." in message
    assert examples.read_bytes() == before


def test_search_rejects_output_symlink(tiny_index, tiny_encoder, tmp_path):
    examples = ship_point_geojson(tmp_path / "examples.geojson")
    before = examples.read_bytes()
    link = tmp_path / "link.geojson"
    link.symlink_to(examples)

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": str(examples), "ENCODER": tiny_encoder, "OUTPUT": str(link),
    })

    assert "is the file of POSITIVES" in message
    assert examples.read_bytes() == before


def test_search_output_other_geopackage_layer(tiny_index, tiny_encoder, tmp_path):
    geopackage = tmp_path / "work.gpkg"
    converted = gdal.VectorTranslate(
        str(geopackage), str(ship_point_geojson(tmp_path / "examples.geojson")), format="GPKG", layerName="examples"
    )
    assert converted is not None
    # Dropping the dataset closes the file.
    converted = None

    results = run_algorithm("search", {
        "INDEX": tiny_index,
        "POSITIVES": f"{geopackage}|layername=examples",
        "ENCODER": tiny_encoder,
        "K": 3,
        "OUTPUT": f"ogr:dbname='{geopackage}' table=\"matches\" (geom)",
    })

    assert results["MATCH_COUNT"] == 3
    examples_layer = QgsVectorLayer(f"{geopackage}|layername=examples", "examples", "ogr")
    assert examples_layer.isValid()
    assert examples_layer.featureCount() == 1


def user_vector_file(path: Path, driver: str, layer_name: str = "") -> Path:
    """Write one point of the analyst's own to ``path`` in the OGR format ``driver``."""
    options = {"layerName": layer_name} if layer_name else {}
    converted = gdal.VectorTranslate(str(path), str(ship_point_geojson(path.parent / f"{path.stem}_source.geojson")),
                                     format=driver, **options)
    assert converted is not None
    # Dropping the dataset closes the file.
    converted = None
    return path


def user_geopackage(path: Path) -> Path:
    """Write a GeoPackage with one point layer of the analyst's own, 'parcels'."""
    return user_vector_file(path, "GPKG", "parcels")


def test_search_keeps_geopackage_written_while_it_ran(tiny_index, tiny_encoder, tmp_path, monkeypatch):
    output = tmp_path / "shared.gpkg"
    real_rank_tiles = SearchAlgorithm._rank_tiles

    def rank_while_another_program_writes(self, *args, **kwargs):
        user_geopackage(output)
        return real_rank_tiles(self, *args, **kwargs)

    monkeypatch.setattr(SearchAlgorithm, "_rank_tiles", rank_while_another_program_writes)

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "OUTPUT": str(output),
    })

    assert "did not write (parcels)" in message
    assert QgsVectorLayer(f"{output}|layername=parcels", "parcels", "ogr").isValid()


def test_search_output_folder_missing(tiny_index, tiny_encoder, tmp_path):
    missing = tmp_path / "no such folder"

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(missing / "matches.gpkg"),
    })

    assert f"OUTPUT: the folder {missing} does not exist" in message
    assert not missing.exists()


def test_search_keeps_user_geopackage(tiny_index, tiny_encoder, tmp_path):
    geopackage = user_geopackage(tmp_path / "work.gpkg")
    before = geopackage.read_bytes()

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(geopackage),
    })

    assert f"OUTPUT: {geopackage} contains layers or fields that Lookalike did not write (parcels)" in message
    assert f"with this OUTPUT: ogr:dbname='{geopackage}' table=\"matches\" (geom)" in message
    assert geopackage.read_bytes() == before


def test_search_keeps_user_layer_named(tiny_index, tiny_encoder, tmp_path):
    geopackage = user_geopackage(tmp_path / "work.gpkg")
    before = geopackage.read_bytes()

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": f"ogr:dbname='{geopackage}' table=\"parcels\" (geom)",
    })

    assert f"OUTPUT: the layer 'parcels' of {geopackage} is not a Lookalike match layer" in message
    assert geopackage.read_bytes() == before


def test_search_keeps_non_vector_file(tiny_index, tiny_encoder, tmp_path):
    notes = tmp_path / "notes.gpkg"
    notes.write_text("field notes, not a GeoPackage", encoding="utf-8")

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(notes),
    })

    assert f"OUTPUT: {notes} exists but cannot be opened" in message
    assert notes.read_text(encoding="utf-8") == "field notes, not a GeoPackage"


def test_search_keeps_shapefile_table(tiny_index, tiny_encoder, tmp_path):
    table = tmp_path / "roads.dbf"
    table.write_bytes(b"the analyst's attribute table")

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / "roads.shp"),
    })

    assert f"would replace {table}, which Lookalike did not write" in message
    assert table.read_bytes() == b"the analyst's attribute table"


@pytest.mark.parametrize("name", ["matches.gpkg", "matches.shp", "matches.geojson"])
def test_search_replaces_own_output(tiny_index, tiny_encoder, tmp_path, name):
    parameters = {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / name),
    }
    assert run_algorithm("search", {**parameters, "K": 2})["MATCH_COUNT"] == 2

    results = run_algorithm("search", {**parameters, "K": 3})

    assert results["MATCH_COUNT"] == 3
    assert QgsVectorLayer(str(tmp_path / name), "matches", "ogr").featureCount() == 3


def test_search_output_without_extension_checked(tiny_index, tiny_encoder, tmp_path):
    # QGIS writes work.gpkg for OUTPUT=work, so that is the file to keep.
    geopackage = user_geopackage(tmp_path / "work.gpkg")
    before = geopackage.read_bytes()

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / "work"),
    })

    assert f"OUTPUT: {geopackage} contains layers or fields that Lookalike did not write (parcels)" in message
    assert geopackage.read_bytes() == before


def test_search_output_named_like_raster(tiny_index, tiny_encoder, tmp_path):
    # QGIS writes scene.tif.gpkg beside scene.tif, which stays as it is.
    raster = tmp_path / "scene.tif"
    raster.write_bytes(b"not really a raster")

    results = run_algorithm("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "K": 2,
        "OUTPUT": str(raster),
    })

    assert results["MATCH_COUNT"] == 2
    assert raster.read_bytes() == b"not really a raster"
    assert (tmp_path / "scene.tif.gpkg").is_file()


def test_search_output_in_checkpoint_folder_rejected(tiny_index, tiny_encoder, tmp_path):
    (tmp_path / "harbour").mkdir()
    (tmp_path / "harbour.partial").mkdir()
    output = tmp_path / "harbour.partial" / "matches.gpkg"

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "OUTPUT": str(output),
    })

    assert f"the checkpoint folder of builds into {tmp_path / 'harbour'}" in message
    assert list((tmp_path / "harbour.partial").iterdir()) == []


def test_search_reports_shapefile_as_written(tiny_index, tiny_encoder, tmp_path):
    results = run_algorithm("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / "SHIPS.SHP"),
    })

    assert Path(results["OUTPUT"]).is_file()


@pytest.mark.parametrize("folder_name", ["results", "matches.gpkg"])
def test_search_output_folder_rejected(tiny_index, tiny_encoder, tmp_path, folder_name):
    # QGIS adds .gpkg to a path without an extension, which would write results.gpkg beside the folder.
    folder = tmp_path / folder_name
    folder.mkdir()

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(folder),
    })

    assert f"OUTPUT: {folder} is a folder; give the name of a file" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == [folder_name]


@pytest.mark.parametrize("name, driver", [("roads.shp", "ESRI Shapefile"), ("roads.geojson", "GeoJSON")])
def test_search_no_layer_added_to_single_layer_file(tiny_index, tiny_encoder, tmp_path, name, driver):
    path = tmp_path / name
    user_vector_file(path, driver)
    before = {member.name: member.read_bytes() for member in tmp_path.glob("roads.*")}

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": f"ogr:dbname='{path}' table=\"matches\" (geom)",
    })

    assert f"OUTPUT: Lookalike adds a layer only to a GeoPackage (.gpkg), not to {path}" in message
    assert {member.name: member.read_bytes() for member in tmp_path.glob("roads.*")} == before


def test_search_user_shapefile_gets_no_layer_advice(tiny_index, tiny_encoder, tmp_path):
    path = tmp_path / "roads.shp"
    user_vector_file(path, "ESRI Shapefile")

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "OUTPUT": str(path),
    })

    assert "contains layers or fields that Lookalike did not write (roads)" in message
    assert "ogr:dbname" not in message


def test_search_layer_advice_quotes_path(tiny_index, tiny_encoder, tmp_path):
    folder = tmp_path / "analyst's data"
    folder.mkdir()
    geopackage = user_geopackage(folder / "work.gpkg")

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(geopackage),
    })

    advised = message[message.index("with this OUTPUT: ") + len("with this OUTPUT: "):]
    results = run_algorithm("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "K": 2,
        "OUTPUT": advised,
    })
    assert results["MATCH_COUNT"] == 2
    assert QgsVectorLayer(f"{geopackage}|layername=parcels", "parcels", "ogr").featureCount() == 1
    assert QgsVectorLayer(f"{geopackage}|layername=matches", "matches", "ogr").featureCount() == 2


def test_search_keeps_raster_table_of_geopackage(tiny_index, tiny_encoder, ships_raster, tmp_path):
    geopackage = tmp_path / "mixed.gpkg"
    parameters = {"INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
                  "OUTPUT": str(geopackage)}
    run_algorithm("search", parameters)
    added = gdal.Translate(str(geopackage), ships_raster, format="GPKG", width=32, height=32,
                           creationOptions=["APPEND_SUBDATASET=YES", "RASTER_TABLE=imagery"])
    assert added is not None
    added = None
    before = geopackage.read_bytes()

    message = run_failure("search", parameters)

    assert "did not write (imagery" in message
    assert geopackage.read_bytes() == before


def test_search_keeps_geopackage_metadata(tiny_index, tiny_encoder, tmp_path):
    # OGR lists no gpkg_metadata table as a layer, but replacing the file would delete it.
    import sqlite3

    geopackage = tmp_path / "described.gpkg"
    parameters = {"INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
                  "OUTPUT": str(geopackage)}
    run_algorithm("search", parameters)
    connection = sqlite3.connect(geopackage)
    connection.execute("CREATE TABLE gpkg_metadata (id INTEGER PRIMARY KEY, metadata TEXT)")
    connection.execute("INSERT INTO gpkg_metadata (metadata) VALUES ('reviewed by the analyst')")
    connection.commit()
    connection.close()
    before = geopackage.read_bytes()

    message = run_failure("search", parameters)

    assert "did not write (gpkg_metadata)" in message
    assert geopackage.read_bytes() == before


def test_search_keeps_fields_added_to_matches(tiny_index, tiny_encoder, tmp_path):
    geopackage = tmp_path / "reviewed.gpkg"
    parameters = {"INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
                  "OUTPUT": str(geopackage)}
    run_algorithm("search", parameters)
    layer = QgsVectorLayer(str(geopackage), "reviewed", "ogr")
    assert layer.dataProvider().addAttributes([QgsField("verified", QVariant.String)])
    layer = None
    before = geopackage.read_bytes()

    message = run_failure("search", parameters)

    assert "contains layers or fields that Lookalike did not write (reviewed)" in message
    assert geopackage.read_bytes() == before


def test_search_keeps_column_added_to_csv(tiny_index, tiny_encoder, tmp_path):
    table = tmp_path / "reviewed.csv"
    parameters = {"INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
                  "OUTPUT": str(table)}
    run_algorithm("search", parameters)
    lines = table.read_text(encoding="utf-8").splitlines()
    table.write_text("\n".join([lines[0] + ",my_notes"] + [line + ",checked by hand" for line in lines[1:]]) + "\n",
                     encoding="utf-8")
    before = table.read_bytes()

    message = run_failure("search", parameters)

    assert "contains layers or fields that Lookalike did not write (reviewed)" in message
    assert table.read_bytes() == before


def test_search_layer_name_compared_without_case(tiny_index, tiny_encoder, tmp_path):
    geopackage = user_geopackage(tmp_path / "work.gpkg")
    before = geopackage.read_bytes()

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": f"ogr:dbname='{geopackage}' table=\"PARCELS\" (geom)",
    })

    assert f"OUTPUT: the layer 'parcels' of {geopackage} is not a Lookalike match layer" in message
    assert geopackage.read_bytes() == before


@pytest.mark.parametrize("form", ["ogr:{path}", "ogr:dbname='{path}'"])
def test_search_ogr_uri_keeps_shapefile(tiny_index, tiny_encoder, tmp_path, form):
    path = tmp_path / "data.shp"
    user_vector_file(path, "ESRI Shapefile")
    before = {member.name: member.read_bytes() for member in tmp_path.glob("data.*")}

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": form.format(path=path),
    })

    assert "Lookalike adds a layer only to a GeoPackage (.gpkg)" in message
    assert {member.name: member.read_bytes() for member in tmp_path.glob("data.*")} == before


def test_search_ogr_path_into_index_rejected(tiny_index, tiny_encoder, tmp_path):
    folder = index_copy(tiny_index, tmp_path)

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": f"ogr:{folder / 'new.gpkg'}",
    })

    assert "is inside the Lookalike index folder" in message
    assert not (folder / "new.gpkg").exists()


def test_search_keeps_upper_case_shapefile(tiny_index, tiny_encoder, tmp_path):
    path = tmp_path / "data.shp"
    user_vector_file(path, "ESRI Shapefile")
    for member in list(tmp_path.glob("data.*")):
        member.rename(member.with_suffix(member.suffix.upper()))
    before = {member.name: member.read_bytes() for member in tmp_path.glob("data.*")}

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "OUTPUT": str(path),
    })

    assert "Lookalike did not write" in message
    assert {member.name: member.read_bytes() for member in tmp_path.glob("data.*")} == before


@pytest.mark.parametrize("name, sidecars", [
    ("matches.gml", ["matches.xsd"]),
    ("matches.tab", ["matches.dat", "matches.map", "matches.id"]),
    ("matches.json", ["matches.json.geojson"]),
    ("matches.xml", ["matches/matches.csv"]),
])
def test_search_rejects_other_formats(tiny_index, tiny_encoder, tmp_path, name, sidecars):
    # QGIS writes these beside or instead of the file named, so a check of that name alone misses them.
    for sidecar in sidecars:
        (tmp_path / sidecar).parent.mkdir(exist_ok=True)
        (tmp_path / sidecar).write_text("the analyst's file", encoding="utf-8")

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / name),
    })

    assert f"OUTPUT: {tmp_path / name} is not a format Lookalike writes matches to" in message
    assert ".gpkg, .shp, .geojson, .fgb, .csv" in message
    for sidecar in sidecars:
        assert (tmp_path / sidecar).read_text(encoding="utf-8") == "the analyst's file"


def test_search_advice_avoids_taken_layer_name(tiny_index, tiny_encoder, tmp_path):
    geopackage = tmp_path / "work.gpkg"
    user_vector_file(geopackage, "GPKG", "matches")

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(geopackage),
    })

    assert f"with this OUTPUT: ogr:dbname='{geopackage}' table=\"matches_2\" (geom)" in message


def test_search_into_examples_file_needs_layer(tiny_index, tiny_encoder, tmp_path):
    geopackage = user_geopackage(tmp_path / "work.gpkg")
    before = geopackage.read_bytes()

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": str(geopackage), "ENCODER": tiny_encoder,
        "OUTPUT": f"ogr:dbname='{geopackage}' table=\"matches\" (geom)",
    })

    assert f"give POSITIVES with its layer name ({geopackage}|layername=...)" in message
    assert geopackage.read_bytes() == before


@pytest.mark.parametrize("output_parameter, name", [("OUTPUT_HTML", "report.html"), ("OUTPUT_JSON", "report.json")])
def test_indexinfo_keeps_user_file(tiny_index, tmp_path, output_parameter, name):
    user_file = tmp_path / name
    user_file.write_text('{"my": "settings"}', encoding="utf-8")

    message = run_failure("indexinfo", {"INDEX": tiny_index, output_parameter: str(user_file)})

    assert f"{output_parameter}: {user_file} exists and is not" in message
    assert user_file.read_text(encoding="utf-8") == '{"my": "settings"}'


@pytest.mark.parametrize("output_parameter, name", [("OUTPUT_HTML", "report.html"), ("OUTPUT_JSON", "report.json")])
def test_indexinfo_replaces_own_report(tiny_index, tmp_path, output_parameter, name):
    report = tmp_path / name
    run_algorithm("indexinfo", {"INDEX": tiny_index, output_parameter: str(report)})
    written = report.read_bytes()
    report.write_bytes(written + b"\n")

    run_algorithm("indexinfo", {"INDEX": tiny_index, output_parameter: str(report)})

    assert report.read_bytes() == written


def test_indexinfo_keeps_other_index_manifest(tiny_index, two_raster_index, tmp_path):
    manifest = Path(two_raster_index) / "manifest.json"
    before = manifest.read_bytes()

    message = run_failure("indexinfo", {"INDEX": tiny_index, "OUTPUT_JSON": str(manifest)})

    assert f"OUTPUT_JSON: {manifest} is inside the Lookalike index folder {Path(two_raster_index)}" in message
    assert manifest.read_bytes() == before
    assert TileIndex.open(two_raster_index).count > 0


@pytest.mark.parametrize("inside", ["", "chips", "chips/deeper"])
def test_exportchips_keeps_out_of_index_folders(two_raster_index, ships_raster, tmp_path, inside):
    index_folder = Path(two_raster_index)
    before = folder_contents(index_folder)
    folder = index_folder / inside if inside else index_folder

    message = run_failure("exportchips", {
        "INPUT": polygon_layer([SHIPS_RASTER_BOX]), "RASTER": ships_raster, "OUTPUT": str(folder),
    })

    expected = "is inside the Lookalike index folder" if inside else "is a Lookalike index folder"
    assert f"OUTPUT: {folder} {expected}" in message
    assert folder_contents(index_folder) == before


def test_indexinfo_rejects_same_file_twice(tiny_index, tmp_path):
    report = tmp_path / "report.txt"

    message = run_failure("indexinfo", {"INDEX": tiny_index, "OUTPUT_HTML": str(report), "OUTPUT_JSON": str(report)})

    assert f"OUTPUT_HTML and OUTPUT_JSON are the same file {report}" in message
    assert not report.exists()


def test_indexinfo_rejects_folder_output(tiny_index, tmp_path):
    folder = tmp_path / "report.html"
    folder.mkdir()

    message = run_failure("indexinfo", {"INDEX": tiny_index, "OUTPUT_HTML": str(folder)})

    assert f"OUTPUT_HTML: {folder} is a folder; give the name of a file to write." in message


def test_indexinfo_keeps_hard_linked_manifest(tiny_index, two_raster_index, tmp_path):
    # Through a hard link outside the index, another index's manifest looks like any JSON file.
    manifest = Path(two_raster_index) / "manifest.json"
    before = manifest.read_bytes()
    link = tmp_path / "report.json"
    os.link(manifest, link)

    message = run_failure("indexinfo", {"INDEX": tiny_index, "OUTPUT_JSON": str(link)})

    assert f"OUTPUT_JSON: {link} exists and is not a copy of this index's manifest" in message
    assert manifest.read_bytes() == before


def test_indexinfo_rewrite_keeps_linked_manifest(tiny_index, tmp_path):
    # A hard link to this index's own manifest is a copy it may replace, without writing through the link.
    folder = index_copy(tiny_index, tmp_path)
    manifest = folder / "manifest.json"
    before = manifest.read_bytes()
    link = tmp_path / "report.json"
    os.link(manifest, link)
    manifest_json = json.loads(before)
    manifest_json["note"] = "kept"
    manifest.write_text(json.dumps(manifest_json), encoding="utf-8")
    edited = manifest.read_bytes()

    run_algorithm("indexinfo", {"INDEX": str(folder), "OUTPUT_JSON": str(link)})

    assert manifest.read_bytes() == edited
    assert json.loads(link.read_text(encoding="utf-8"))["index_id"] == manifest_json["index_id"]


def index_copy(tiny_index: str, tmp_path: Path) -> Path:
    """Copy the shared index for a test that could damage it, so a failure stays in that test."""
    return Path(shutil.copytree(tiny_index, tmp_path / "index_copy"))


def test_search_rejects_output_in_index(tiny_index, tiny_encoder, tmp_path):
    # A .json output such as the manifest is not a format search writes; a GeoPackage there is refused too.
    folder = index_copy(tiny_index, tmp_path)
    before = folder_contents(folder)

    message = run_failure("search", {
        "INDEX": str(folder),
        "POSITIVES": point_layer([SHIP_CENTRE]),
        "ENCODER": tiny_encoder,
        "OUTPUT": str(folder / "matches.gpkg"),
    })

    assert f"is inside the index folder {folder}" in message
    assert folder_contents(folder) == before


@pytest.mark.parametrize("output_parameter", ["OUTPUT_HTML", "OUTPUT_JSON"])
@pytest.mark.parametrize("through_link", [False, True])
def test_indexinfo_rejects_output_in_index(tiny_index, tmp_path, output_parameter, through_link):
    folder = index_copy(tiny_index, tmp_path)
    before = folder_contents(folder)
    graph_file = next(name for name in before if name.endswith(".hnsw"))
    written_folder = folder
    if through_link:
        written_folder = tmp_path / "link_to_index"
        written_folder.symlink_to(folder, target_is_directory=True)
    target = written_folder / graph_file

    message = run_failure("indexinfo", {"INDEX": str(folder), output_parameter: str(target)})

    assert f"{output_parameter}: {target} is inside the index folder {folder}" in message
    assert folder_contents(folder) == before
    assert TileIndex.open(folder).count > 0


# -- K -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2.5, 1.4, "2.5", 2147483648, 4294967297, MAX_K + 1])
def test_search_rejects_invalid_k(tiny_index, tiny_encoder, k):
    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "K": k,
        "OUTPUT": "memory:",
    })

    assert f"K={k} " in message
    assert f"give a whole number from 1 to {MAX_K}." in message
    assert "k 0" not in message


@pytest.mark.parametrize("min_score", ["0,8", "abc"])
def test_search_rejects_text_min_score(tiny_index, tiny_encoder, min_score):
    # QGIS reads such text in an optional number as 0, which dropped no match.
    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "MIN_SCORE": min_score, "OUTPUT": "memory:",
    })

    assert f"MIN_SCORE={min_score!r} is not a number; give a number from -2 to 1." in message


@pytest.mark.parametrize("name", ["MIN_SCORE", "MAX_OVERLAP"])
def test_search_rejects_nan(tiny_index, tiny_encoder, name):
    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        name: "nan", "OUTPUT": "memory:",
    })

    assert f"{name}=nan is not a number; give a number from" in message


@pytest.mark.parametrize(("name", "value"), [("OVERLAP_PERCENT", "50%"), ("TILE_SIZE", "abc"), ("GSD", "0,5")])
def test_build_rejects_text_numbers(provider, tmp_path, ships_raster, name, value):
    message = run_failure("buildindex", {
        "INPUT_RASTERS": [ships_raster], name: value, "OUTPUT": str(tmp_path / "index"),
    })

    assert f"{name}={value!r} is not a number" in message
    assert not (tmp_path / "index").exists()


def test_search_accepts_k_maximum(tiny_index, tiny_encoder):
    results = run_algorithm("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder, "K": MAX_K,
        "MAX_OVERLAP": 1.0, "OUTPUT": "memory:",
    })

    # Every tile but those under the example's tile, which overlaps at most four grid tiles.
    tile_count = TileIndex.open(tiny_index).count
    assert results["MATCH_COUNT"] < tile_count
    assert results["MATCH_COUNT"] >= tile_count - 4


def test_export_rejects_fractional_chip_size(provider, tmp_path, ships_raster):
    message = run_failure("exportchips", {
        "INPUT": polygon_layer([(558505.0, 4176040.0, 558665.0, 4176200.0)]),
        "RASTER": ships_raster,
        "CHIP_SIZE_PX": 64.5,
        "OUTPUT": str(tmp_path / "chips"),
    })

    assert "CHIP_SIZE_PX=64.5 is invalid for 'Chip size (pixels, long side)'" in message
    assert "because it is not a whole number; give a whole number from 0 to" in message


@pytest.mark.parametrize("strategy", [2, -1, "2"])
def test_search_rejects_unknown_strategy(tiny_index, tiny_encoder, strategy):
    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "STRATEGY": strategy, "OUTPUT": "memory:",
    })

    assert f"STRATEGY={strategy} is invalid for 'How several examples combine'" in message
    assert "give one of 0 (mean), 1 (max)." in message
    assert "Incorrect parameter value" not in message


# -- examples without geometry -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("geometries", "expected"),
    [
        ([], "has no features"),
        ([None, None], "has 2 feature(s) but none has a geometry"),
    ],
)
def test_search_examples_without_geometry(tiny_index, tiny_encoder, tmp_path, geometries, expected):
    examples = write_geojson(tmp_path / "examples.geojson", geometries)

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": str(examples), "ENCODER": tiny_encoder, "OUTPUT": "memory:",
    })

    assert message.startswith("POSITIVES (")
    assert expected in message
    assert "no example to search with" in message
    assert "CRS" not in message


def test_search_warns_features_without_geometry(tiny_index, tiny_encoder, tmp_path):
    examples = write_geojson(tmp_path / "examples.geojson", [{"type": "Point", "coordinates": list(SHIP_CENTRE)}, None])
    feedback = RecordingFeedback()

    results = run_algorithm("search", {
        "INDEX": tiny_index, "POSITIVES": str(examples), "ENCODER": tiny_encoder, "K": 3, "OUTPUT": "memory:",
    }, feedback)

    assert results["MATCH_COUNT"] == 3
    assert any("1 feature(s) of POSITIVES have no geometry and were left out" in text for text in feedback.warnings)


# -- empty results -----------------------------------------------------------------------------


def test_search_no_match_examples_cover_index(tiny_index, tiny_encoder):
    feedback = RecordingFeedback()

    results = run_algorithm("search", {
        "INDEX": tiny_index,
        "POSITIVES": polygon_layer([SHIPS_RASTER_BOX]),
        "ENCODER": tiny_encoder,
        "K": 5,
        "OUTPUT": "memory:",
    }, feedback)

    assert results["MATCH_COUNT"] == 0
    assert len(feedback.warnings) == 1
    warning = feedback.warnings[0]
    assert "every tile of the index overlaps a positive example" in warning
    assert "Draw smaller examples" in warning
    assert "minimum score" not in warning
    assert "MIN_SCORE" not in warning


def test_search_no_match_min_score(tiny_index, tiny_encoder):
    feedback = RecordingFeedback()

    results = run_algorithm("search", {
        "INDEX": tiny_index,
        "POSITIVES": point_layer([SHIP_CENTRE]),
        "ENCODER": tiny_encoder,
        "MIN_SCORE": 1.0,
        "OUTPUT": "memory:",
    }, feedback)

    assert results["MATCH_COUNT"] == 0
    assert len(feedback.warnings) == 1
    warning = feedback.warnings[0]
    assert "no tile scored at least MIN_SCORE=1" in warning
    assert "the best one scored" in warning
    assert "overlaps a positive example" not in warning


# -- examples over several rasters -------------------------------------------------------------


def test_search_reads_example_from_second_raster(two_raster_index):
    feedback = RecordingFeedback()

    results = run_algorithm("search", {
        "INDEX": two_raster_index, "POSITIVES": point_layer([POINT_ON_RGB4], crs=RGB_CRS), "K": 3,
        "OUTPUT": "memory:",
    }, feedback)

    assert results["MATCH_COUNT"] == 3
    searching = [info for info in feedback.infos if info.startswith("Searching")]
    assert len(searching) == 1
    assert searching[0].endswith("rgb4.tif")


def test_search_reads_examples_from_both_rasters(two_raster_index):
    feedback = RecordingFeedback()

    results = run_algorithm("search", {
        "INDEX": two_raster_index,
        "POSITIVES": point_layer([POINT_ON_RGB1, POINT_ON_RGB4], crs=RGB_CRS),
        "K": 3,
        "OUTPUT": "memory:",
    }, feedback)

    assert results["MATCH_COUNT"] == 3
    searching = next(info for info in feedback.infos if info.startswith("Searching"))
    assert "rgb1.tif" in searching
    assert "rgb4.tif" in searching


def test_search_rejects_example_off_every_raster(two_raster_index):
    message = run_failure("search", {
        "INDEX": two_raster_index, "POSITIVES": point_layer([(500000.0, 2000000.0)], crs=RGB_CRS),
        "OUTPUT": "memory:",
    })

    assert "outside every indexed raster" in message
    assert "rgb1.tif" in message


def test_search_names_the_negative_off_every_raster(two_raster_index):
    negatives = point_layer([POINT_ON_RGB4, (500000.0, 2000000.0)], crs=RGB_CRS)
    off_raster_id = [feature.id() for feature in negatives.getFeatures()][1]

    message = run_failure("search", {
        "INDEX": two_raster_index, "POSITIVES": point_layer([POINT_ON_RGB1], crs=RGB_CRS),
        "NEGATIVES": negatives, "OUTPUT": "memory:",
    })

    assert f"Feature with id {off_raster_id} in NEGATIVES: The query lies outside every indexed raster" in message
    assert "check the CRS of its layer" in message


def test_search_names_the_positive_that_is_a_line(two_raster_index):
    layer = QgsVectorLayer(f"LineString?crs={RGB_CRS}", "lines", "memory")
    feature = QgsFeature()
    x, y = POINT_ON_RGB1
    feature.setGeometry(QgsGeometry.fromWkt(f"LINESTRING({x} {y}, {x + 500} {y + 500})"))
    layer.dataProvider().addFeatures([feature])
    feature_id = next(layer.getFeatures()).id()

    message = run_failure("search", {"INDEX": two_raster_index, "POSITIVES": layer, "OUTPUT": "memory:"})

    assert f"Feature with id {feature_id} in POSITIVES:" in message
    assert "LINESTRING is not supported" in message


def test_search_given_raster_overrides_index(two_raster_index, shared_data):
    rgb1 = str(shared_data / RASTERIO / "rgb1.tif")

    message = run_failure("search", {
        "INDEX": two_raster_index, "POSITIVES": point_layer([POINT_ON_RGB4], crs=RGB_CRS), "RASTER": rgb1,
        "OUTPUT": "memory:",
    })

    assert "rgb1.tif" in message


# -- encoder -----------------------------------------------------------------------------------


def test_search_missing_recorded_encoder(provider, tmp_path, ships_raster, tiny_encoder):
    moved_encoder = tmp_path / "tiny_copy.onnx"
    shutil.copyfile(tiny_encoder, moved_encoder)
    folder = tmp_path / "index"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster], "ENCODER": str(moved_encoder), "TILE_SIZE": 32, "EXTENT": SHIP_EXTENT,
        "OUTPUT": str(folder),
    })
    moved_encoder.unlink()

    message = run_failure("search", {
        "INDEX": str(folder), "POSITIVES": point_layer([SHIP_CENTRE]), "OUTPUT": "memory:",
    })

    assert f"encoder file {moved_encoder}" in message
    assert "tiny_test_encoder" in message
    assert "no longer exists" in message
    assert "Set ENCODER to that ONNX file" in message


def test_search_bundled_encoder_moved(provider, tmp_path, ships_raster):
    """An index built with the bundled encoder of an install that is gone finds this install's copy."""
    old_install_model = tmp_path / "old_install" / default_model_path().name
    old_install_model.parent.mkdir()
    shutil.copyfile(default_model_path(), old_install_model)
    folder = tmp_path / "index"
    built = run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster], "ENCODER": str(old_install_model), "TILE_SIZE": 32,
        "EXTENT": SHIP_EXTENT, "OUTPUT": str(folder),
    })
    old_install_model.unlink()

    results = run_algorithm("search", {
        "INDEX": str(folder), "POSITIVES": point_layer([SHIP_CENTRE]), "K": 2, "OUTPUT": "memory:",
    })

    assert results["MATCH_COUNT"] == 2
    layer = results["OUTPUT"]
    if not isinstance(layer, QgsVectorLayer):
        layer = QgsVectorLayer(layer, "matches", "ogr")
    assert {feature["encoder"] for feature in layer.getFeatures()} == {built["ENCODER_NAME"]}


def test_search_encoder_help_default(provider):
    help_text = provider.algorithm("search").parameterDefinition("ENCODER").help()

    assert "Empty uses the encoder file recorded in the index." in help_text
    assert "names the missing file" in help_text


# -- rasters that are not rasters --------------------------------------------------------------


@pytest.fixture()
def not_rasters(tmp_path) -> dict[str, Path]:
    text_file = tmp_path / "notraster.tif"
    text_file.write_text("not a raster", encoding="utf-8")
    folder = tmp_path / "folder.tif"
    folder.mkdir()
    return {
        "vector file": ship_point_geojson(tmp_path / "points.geojson"),
        "text file": text_file,
        "folder": folder,
    }


@pytest.mark.parametrize("kind", ["vector file", "text file", "folder"])
def test_search_rejects_non_raster(tiny_index, tiny_encoder, not_rasters, kind):
    path = not_rasters[kind]

    message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "RASTER": str(path), "OUTPUT": "memory:",
    })

    assert f"RASTER: {path} is a" in message
    assert "not a raster GDAL can read" in message
    assert "Could not load" not in message


@pytest.mark.parametrize("kind", ["vector file", "text file", "folder"])
def test_build_rejects_non_raster(provider, tmp_path, not_rasters, tiny_encoder, kind):
    path = not_rasters[kind]

    message = run_failure("buildindex", {
        "INPUT_RASTERS": [str(path)], "ENCODER": tiny_encoder, "OUTPUT": str(tmp_path / "index"),
    })

    assert f"INPUT_RASTERS: {path} is a" in message
    assert "not a raster GDAL can read" in message
    assert "Incorrect parameter value" not in message
    assert not (tmp_path / "index").exists()


def test_qgis_process_non_raster_one_message(repo_root, tmp_path, not_rasters):
    """qgis_process prints the plugin's message once, and QGIS's own check no longer loads the file."""
    if shutil.which("qgis_process.bin") is None and not Path("/usr/bin/qgis_process.bin").is_file():
        pytest.skip("qgis_process.bin is not installed")
    environment = dict(os.environ, LOOKALIKE_QGIS_PROCESS_HOME=str(tmp_path / "qgis_process_home"))

    completed = subprocess.run(
        ["bash", str(repo_root / "scripts" / "qgis_process.sh"), "run", "lookalike:buildindex", "--",
         f"INPUT_RASTERS={not_rasters['text file']}", f"OUTPUT={tmp_path / 'index'}"],
        capture_output=True, text=True, env=environment, timeout=QGIS_PROCESS_TIMEOUT_S, check=False,
    )

    assert completed.returncode != 0
    stderr = completed.stderr
    assert stderr.count("not a raster GDAL can read") == 1, stderr
    assert "Incorrect parameter value" not in stderr
    # qgis_process loads every value once itself, to find missing parameters, before the
    # algorithm's check runs; QGIS's own check of the algorithm loaded it a second time.
    assert stderr.count("Unable to load mesh") <= 1, stderr
    assert stderr.count("not recognized as a supported file format") <= 1, stderr


# -- numbers, core messages and help -----------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("TILE_SIZE", -5), ("TILE_SIZE", 0), ("GSD", -1), ("GSD", 0)])
def test_build_positive_bound_stated(provider, tmp_path, ships_raster, tiny_encoder, name, value):
    message = run_failure("buildindex", {
        "INPUT_RASTERS": [ships_raster], "ENCODER": tiny_encoder, name: value, "OUTPUT": str(tmp_path / "index"),
    })

    assert f"{name}={value} is out of range" in message
    assert "give a number greater than 0." in message
    assert "at least 0" not in message


def test_core_error_names_parameter():
    with pytest.raises(QgsProcessingException) as raised, core_errors({"index_folder": "INDEX"}):
        raise SearchError("index_folder /data/index_folder is not an index; pass the folder of a built index")

    assert str(raised.value) == "INDEX /data/index_folder is not an index; pass the folder of a built index"


def test_core_error_full_stop_added():
    with pytest.raises(QgsProcessingException) as raised, core_errors({"tile_size_source_px": "TILE_SIZE in pixels"}):
        raise SearchError("tile_size_source_px 3 is too small; pass at least 8")

    assert str(raised.value) == (
        "tile_size_source_px 3 is too small; pass at least 8. (In this algorithm tile_size_source_px is TILE_SIZE "
        "in pixels.)"
    )


def test_core_error_full_stop_kept():
    with pytest.raises(QgsProcessingException) as raised, core_errors({"tile_size_source_px": "TILE_SIZE in pixels"}):
        raise SearchError("tile_size_source_px 3 is too small.")

    assert str(raised.value) == (
        "tile_size_source_px 3 is too small. (In this algorithm tile_size_source_px is TILE_SIZE in pixels.)"
    )


@pytest.mark.parametrize("name", ["buildindex", "search", "exportchips", "indexinfo"])
def test_help_is_plain_text(provider, name):
    algorithm = provider.algorithm(name)

    help_text = algorithm.shortHelpString()

    for character in "<>&":
        assert character not in help_text, f"{name} help contains {character!r}"
    lines = help_text.split("\n")
    assert lines[0] == algorithm.SUMMARY
    for definition in algorithm.parameterDefinitions():
        assert f"{definition.description()} ({definition.name()}): {definition.help()}" in lines


# -- outputs over indexed and exported rasters ------------------------------------------------------


@pytest.fixture()
def clip_copy_index(provider, tmp_path, repo_root, tiny_encoder) -> tuple[Path, Path]:
    """Index of a copy of the sample clip in ``tmp_path``; return (raster, index folder)."""
    raster = Path(shutil.copy(repo_root / SAMPLE_CLIP, tmp_path / "clip.tif"))
    folder = tmp_path / "index"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(raster)], "ENCODER": tiny_encoder, "TILE_SIZE": 32, "OUTPUT": str(folder),
    })
    return raster, folder


@pytest.mark.parametrize("output_parameter", ["OUTPUT_HTML", "OUTPUT_JSON"])
@pytest.mark.parametrize("link", ["none", "symlink", "hard link"])
def test_indexinfo_rejects_output_over_raster(clip_copy_index, tmp_path, output_parameter, link):
    raster, folder = clip_copy_index
    raster_bytes = raster.read_bytes()
    target = raster
    if link == "symlink":
        target = tmp_path / "link.tif"
        target.symlink_to(raster)
    elif link == "hard link":
        target = tmp_path / "hard_link.tif"
        os.link(raster, target)

    message = run_failure("indexinfo", {"INDEX": str(folder), output_parameter: str(target)})

    assert f"{output_parameter}: {target} is the raster {raster} in the index given for INDEX" in message
    assert "Choose another output path" in message
    assert raster.read_bytes() == raster_bytes


def test_indexinfo_keeps_sidecar_without_pam(clip_copy_index, monkeypatch):
    # The tests run with GDAL_PAM_ENABLED=NO, as GDAL then leaves .aux.xml out of a raster's files.
    raster, folder = clip_copy_index
    sidecar = raster.with_name(raster.name + ".aux.xml")
    sidecar.write_text("<PAMDataset><Metadata><MDI key=\"NOTE\">statistics of another program</MDI></Metadata>"
                       "</PAMDataset>")
    monkeypatch.setenv("GDAL_PAM_ENABLED", "NO")

    message = run_failure("indexinfo", {"INDEX": str(folder), "OUTPUT_HTML": str(sidecar)})

    assert f"OUTPUT_HTML: {sidecar} is the file " in message
    assert "statistics of another program" in sidecar.read_text()


def test_indexinfo_writes_beside_raster(clip_copy_index, tmp_path):
    raster, folder = clip_copy_index

    results = run_algorithm("indexinfo", {"INDEX": str(folder), "OUTPUT_JSON": str(tmp_path / "clip.json")})

    assert Path(results["OUTPUT_JSON"]).is_file()


def test_export_rejects_chip_over_raster(provider, tmp_path, repo_root):
    chip_folder = tmp_path / "chips"
    chip_folder.mkdir()
    # A chip exported earlier, used as the raster of the next export into the same folder.
    raster = Path(shutil.copy(repo_root / SAMPLE_CLIP, chip_folder / "chip_00001.tif"))
    raster_bytes = raster.read_bytes()

    message = run_failure("exportchips", {
        "INPUT": polygon_layer([(558505.0, 4176040.0, 558665.0, 4176200.0)]),
        "RASTER": str(raster),
        "OUTPUT": str(chip_folder),
    })

    assert f"OUTPUT: {raster} is the raster {raster} in RASTER" in message
    assert raster.read_bytes() == raster_bytes


# -- ground sizes in metres -------------------------------------------------------------------------

US_SURVEY_FOOT_M = 1200.0 / 3937.0
# Metres per pixel of the sample clip, and its pixel size in US survey feet for the EPSG:2227 copy.
CLIP_PIXEL_SIZE_M = 5.0
CLIP_PIXEL_SIZE_FT = 16.4042


@pytest.fixture(scope="module")
def clip_in_feet(tmp_path_factory, repo_root) -> Path:
    """The sample clip relabelled to EPSG:2227 (US survey feet) with 16.4042 ft (5 m) pixels."""
    source = gdal.Open(str(repo_root / SAMPLE_CLIP))
    width, height = source.RasterXSize, source.RasterYSize
    path = tmp_path_factory.mktemp("feet") / "clip_2227.tif"
    gdal.Translate(str(path), source, outputSRS="EPSG:2227", outputBounds=[
        6000000, 2100000, 6000000 + width * CLIP_PIXEL_SIZE_FT, 2100000 - height * CLIP_PIXEL_SIZE_FT,
    ])
    return path


@pytest.fixture(scope="module")
def clip_in_web_mercator(tmp_path_factory, repo_root) -> Path:
    path = tmp_path_factory.mktemp("web_mercator") / "clip_3857.tif"
    gdal.Warp(str(path), str(repo_root / SAMPLE_CLIP), dstSRS="EPSG:3857")
    return path


def first_grid(index_folder: str) -> TileGrid:
    return TileGrid.from_dict(TileIndex.open(index_folder).sources[0]["grid"])


@pytest.mark.parametrize("size_parameters", [{"TILE_SIZE": 160, "TILE_SIZE_UNIT": 1}, {"GSD": 5.0}])
def test_build_feet_raster_metre_tiles(provider, tmp_path, clip_in_feet, tiny_encoder, size_parameters):
    results = run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(clip_in_feet)], "ENCODER": tiny_encoder, "OUTPUT": str(tmp_path / "index"),
        **size_parameters,
    })

    grid = first_grid(results["OUTPUT"])
    assert grid.tile_ground_size_m == pytest.approx(160.0, rel=1e-6)
    assert grid.tile_ground_size == pytest.approx(160.0 / US_SURVEY_FOOT_M, rel=1e-6)
    xmin, _, xmax, _ = grid.tile_bounds(0, 0)
    assert (xmax - xmin) * US_SURVEY_FOOT_M == pytest.approx(160.0, rel=1e-6)
    # The tiny encoder's input is 32 px, so a 160 m tile has a GSD of 5 m.
    assert results["GSD_USED"] == pytest.approx(5.0, rel=1e-6)
    assert results["TILE_GROUND_SIZE"] == pytest.approx(160.0, rel=1e-6)


def test_build_web_mercator_metre_tiles(provider, tmp_path, clip_in_web_mercator, tiny_encoder):
    results = run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(clip_in_web_mercator)], "ENCODER": tiny_encoder, "TILE_SIZE": 200,
        "TILE_SIZE_UNIT": 1, "OUTPUT": str(tmp_path / "index"),
    })

    grid = first_grid(results["OUTPUT"])
    assert grid.tile_ground_size_m == pytest.approx(200.0, rel=1e-6)
    # Web Mercator stretches lengths by about 1/cos(37.7 degrees) = 1.265 at the clip.
    assert grid.tile_ground_size == pytest.approx(200.0 * 1.265, rel=0.01)
    assert results["GSD_USED"] == pytest.approx(200.0 / 32, rel=1e-6)
    assert results["TILE_GROUND_SIZE"] == pytest.approx(200.0, rel=1e-6)


def test_indexinfo_feet_sizes_in_metres(provider, tmp_path, clip_in_feet, tiny_encoder):
    built = run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(clip_in_feet)], "ENCODER": tiny_encoder, "TILE_SIZE": 160, "TILE_SIZE_UNIT": 1,
        "OUTPUT": str(tmp_path / "index"),
    })

    results = run_algorithm("indexinfo", {"INDEX": built["OUTPUT"]})

    assert results["GSD"] == pytest.approx(CLIP_PIXEL_SIZE_M, rel=1e-6)
    assert results["TILE_GROUND_SIZE"] == pytest.approx(160.0, rel=1e-6)
    assert results["GSD_GRID_UNITS"] == pytest.approx(CLIP_PIXEL_SIZE_M / US_SURVEY_FOOT_M, rel=1e-6)
    assert results["TILE_SIZE_GRID_UNITS"] == pytest.approx(160.0 / US_SURVEY_FOOT_M, rel=1e-6)


def test_build_help_states_metres(provider):
    algorithm = provider.algorithm("buildindex")

    help_text = algorithm.shortHelpString()

    assert algorithm.parameterDefinition("TILE_SIZE_UNIT").options() == [
        "Source pixels (of the first raster)", "Metres on the ground",
    ]
    assert "1: metres on the ground" in algorithm.parameterDefinition("TILE_SIZE_UNIT").help()
    assert "metres per encoder pixel" in algorithm.parameterDefinition("GSD").description()
    assert "grid CRS units" not in help_text
    assert "units of the tile grid's CRS" not in help_text


def test_extent_without_crs_says_how_to_add_one(provider, tmp_path, ships_raster, tiny_encoder):
    message = run_failure("buildindex", {
        "INPUT_RASTERS": [ships_raster], "ENCODER": tiny_encoder, "TILE_SIZE": 32,
        "EXTENT": SHIP_EXTENT.split(" [")[0], "OUTPUT": str(tmp_path / "index"),
    })

    assert "The CRS of EXTENT is unknown" in message
    assert "'xmin,xmax,ymin,ymax [EPSG:32610]'" in message
    assert "Layer Properties" not in message


def test_search_warns_of_raster_changed_since_build(provider, tmp_path, ships_raster, tiny_encoder):
    raster = tmp_path / "ships.tif"
    shutil.copyfile(ships_raster, raster)
    folder = tmp_path / "index"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(raster)], "ENCODER": tiny_encoder, "TILE_SIZE": 32, "EXTENT": SHIP_EXTENT,
        "OUTPUT": str(folder),
    })
    dataset = gdal.Open(str(raster), gdal.GA_Update)
    band = dataset.GetRasterBand(2)
    band.WriteArray(255 - band.ReadAsArray())
    dataset = band = None
    feedback = RecordingFeedback()

    run_algorithm("search", {
        "INDEX": str(folder), "POSITIVES": point_layer([SHIP_CENTRE]), "K": 2, "OUTPUT": "memory:",
    }, feedback=feedback)

    assert any(f"Raster {raster} changed after it was indexed" in text for text in feedback.warnings), \
        feedback.warnings


def test_output_name_too_long_named(tiny_index, tiny_encoder, tmp_path):
    name = "a" * 300
    search_message = run_failure("search", {
        "INDEX": tiny_index, "POSITIVES": point_layer([SHIP_CENTRE]), "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / f"{name}.gpkg"),
    })
    report_message = run_failure("indexinfo", {"INDEX": tiny_index, "OUTPUT_HTML": str(tmp_path / f"{name}.html")})

    assert "cannot be checked (File name too long); choose another output file." in search_message
    assert "cannot be checked (File name too long); choose another file." in report_message
