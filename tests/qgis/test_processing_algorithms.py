"""The Processing algorithms run through ``processing.run`` on real rasters.

Structural checks use the tiny test encoder (32 px input, 16-dim output), so builds take
seconds. The ship search uses the bundled EfficientNet-Lite0, because only its ranking is
meaningful.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from osgeo import gdal
from processing_testing import SHIPS_CRS, point_layer, polygon_layer, run_algorithm
from qgis.core import (
    QgsApplication,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsVectorLayer,
)

from lookalike.core.index import MANIFEST_NAME, TileIndex
from lookalike.core.pipeline import partial_folder_for
from lookalike.gis import matches as match_layers
from lookalike.processing.compat import PARAMETER_ADVANCED

ALGORITHM_IDS = ("buildindex", "search", "exportchips", "indexinfo")

# Centres of the four ships in SHIPS_RASTER (EPSG:32610), read off the image.
SHIP_CENTRES = ((557715.0, 4176235.0), (558585.0, 4176120.0), (559275.0, 4176035.0), (558875.0, 4174935.0))
NAIP_2009 = Path("geo/naip_timeseries/m_4709963_se_14_1_20090818.tif")
NAIP_2014 = Path("geo/naip_timeseries/m_4709963_se_14_1_20140720.tif")


@pytest.fixture(scope="module")
def tiny_index(provider, tmp_path_factory, ships_raster: str, tiny_encoder: str) -> tuple[str, dict]:
    """Index of the ships raster built with the tiny encoder: 32 source px tiles, no overlap."""
    folder = tmp_path_factory.mktemp("tiny") / "index"
    results = run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 32,
        "TILE_SIZE_UNIT": 0,
        "OVERLAP_PERCENT": 0,
        "OUTPUT": str(folder),
    })
    return str(folder), results


def output_layer(results: dict, key: str = "OUTPUT") -> QgsVectorLayer:
    value = results[key]
    if isinstance(value, QgsVectorLayer):
        return value
    layer = QgsVectorLayer(value, "output", "ogr")
    assert layer.isValid(), f"output {value!r} is not a valid vector layer"
    return layer


# -- provider ----------------------------------------------------------------------------------


class RecordingFeedback(QgsProcessingFeedback):
    """Feedback that keeps the warnings an algorithm pushes."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings = []

    def pushWarning(self, warning: str) -> None:  # noqa: N802 - QGIS override
        self.warnings.append(warning)
        super().pushWarning(warning)


def test_provider_registers_algorithms(provider):
    ids = sorted(algorithm.id() for algorithm in provider.algorithms())
    assert ids == sorted(f"lookalike:{name}" for name in ALGORITHM_IDS)


@pytest.mark.parametrize("name", ALGORITHM_IDS)
def test_algorithm_help_texts(provider, name):
    algorithm = QgsApplication.processingRegistry().algorithmById(f"lookalike:{name}")
    assert algorithm is not None
    assert algorithm.shortHelpString()
    for definition in algorithm.parameterDefinitions():
        assert definition.name() == definition.name().upper()
        assert definition.help(), f"{name}: parameter {definition.name()} has no help text"
    assert algorithm.outputDefinitions()


# -- buildindex --------------------------------------------------------------------------------


def test_build_writes_manifest(tiny_index, ships_raster):
    folder, results = tiny_index
    manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert results["OUTPUT"] == folder
    assert results["ENCODER_NAME"] == "tiny_test_encoder"
    assert results["TILES_TOTAL"] == results["TILES_EMBEDDED"] + results["TILES_SKIPPED"]
    assert results["TILES_EMBEDDED"] == manifest["tile_count"] > 0
    assert len(manifest["sources"]) == 1
    assert manifest["sources"][0]["path"] == os.path.abspath(ships_raster)
    # 32 source pixels of 5 m on a 32 px encoder: one encoder pixel per source pixel.
    assert results["GSD_USED"] == pytest.approx(5.0)
    assert manifest["sources"][0]["grid"]["stride_px"] == 32
    assert not partial_folder_for(folder).exists()


def test_build_encoder_threads_stored(provider, tmp_path, ships_raster, tiny_encoder):
    parameters = {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 32,
        "ENCODER_THREADS": 1,
        "OUTPUT": str(tmp_path / "index"),
    }

    run_algorithm("buildindex", parameters)

    manifest = json.loads((tmp_path / "index" / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["build_parameters"]["encoder_threads"] == 1


def test_build_encoder_threads_is_advanced(provider):
    definition = provider.algorithm("buildindex").parameterDefinition("ENCODER_THREADS")

    assert definition.defaultValue() == 0
    assert definition.flags() & PARAMETER_ADVANCED


def test_build_append_adds_raster(provider, tmp_path, shared_data, tiny_encoder):
    folder = tmp_path / "naip"
    extent = "486000,486800,5206000,5206800 [EPSG:26914]"
    first = run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(shared_data / NAIP_2009)],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 160,
        "TILE_SIZE_UNIT": 1,
        "EXTENT": extent,
        "OUTPUT": str(folder),
    })
    feedback = RecordingFeedback()
    second = run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(shared_data / NAIP_2014)],
        "ENCODER": tiny_encoder,
        "EXTENT": extent,
        "APPEND": True,
        "OUTPUT": str(folder),
    }, feedback)
    # NAIP bands carry no red, green and blue interpretation, so the warning names the bands read.
    band_warnings = [text for text in feedback.warnings if "bands [1, 2, 3] are read as" in text]
    assert band_warnings, feedback.warnings
    assert "choose the bands to read (BANDS)" in band_warnings[0]
    index = TileIndex.open(folder)
    assert len(index.sources) == 2
    assert index.count == first["TILES_EMBEDDED"] + second["TILES_EMBEDDED"]
    assert second["GSD_USED"] == pytest.approx(first["GSD_USED"]) == pytest.approx(5.0)


def test_build_warns_overlap_fraction(provider, tmp_path, ships_raster, tiny_encoder):
    feedback = RecordingFeedback()

    results = run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 64,
        "OVERLAP_PERCENT": 0.5,
        "OUTPUT": str(tmp_path / "index"),
    }, feedback)

    assert results["TILES_EMBEDDED"] > 0
    fraction_warnings = [text for text in feedback.warnings
                         if "OVERLAP_PERCENT=0.5 is read as 0.5 % of the tile side" in text]
    assert fraction_warnings, feedback.warnings
    assert "OVERLAP_PERCENT=50" in fraction_warnings[0]


def test_build_append_takes_index_overlap(provider, tmp_path, shared_data, tiny_encoder):
    folder = tmp_path / "naip"
    extent = "486000,486800,5206000,5206800 [EPSG:26914]"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(shared_data / NAIP_2009)],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 160,
        "TILE_SIZE_UNIT": 1,
        "OVERLAP_PERCENT": 50,
        "EXTENT": extent,
        "OUTPUT": str(folder),
    })
    appended = {"INPUT_RASTERS": [str(shared_data / NAIP_2014)], "ENCODER": tiny_encoder, "EXTENT": extent,
                "APPEND": True, "OUTPUT": str(folder)}

    with pytest.raises(QgsProcessingException, match="OVERLAP_PERCENT=30 gives a stride of 22 of 32") as raised:
        run_algorithm("buildindex", {**appended, "OVERLAP_PERCENT": 30})
    assert "leave OVERLAP_PERCENT empty to use the index's overlap, or give 50." in str(raised.value)
    run_algorithm("buildindex", appended)
    feedback = RecordingFeedback()
    again = run_algorithm("buildindex", appended, feedback)

    repeated = [text for text in feedback.warnings if "already contains this build" in text]
    assert repeated, feedback.warnings
    assert "nothing was embedded or added" in repeated[0]
    # No run was interrupted, so no tile came from checkpoints.
    assert again["TILES_RESUMED"] == 0
    grids = [source["grid"] for source in TileIndex.open(folder).sources]
    assert len(grids) == 2
    assert grids[1]["stride_px"] == grids[0]["stride_px"] == grids[0]["tile_size_px"] // 2


def test_build_mask_skips_tiles(provider, tmp_path, ships_raster, tiny_encoder):
    # The mask covers the western half of the raster (x 557050 to 558780).
    mask = polygon_layer([(557000.0, 4174700.0, 558780.0, 4176500.0)], name="mask")
    results = run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 32,
        "MASK": mask,
        "OUTPUT": str(tmp_path / "masked"),
    })
    manifest = json.loads((tmp_path / "masked" / MANIFEST_NAME).read_text(encoding="utf-8"))
    masked = manifest["sources"][0]["skipped_counts"]["masked"]
    assert masked > 0
    assert results["TILES_SKIPPED"] >= masked


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"BANDS": "red,green"}, "BANDS"),
        ({"BANDS": "0,1,2"}, "BANDS"),
        ({"TILE_SIZE": 32, "GSD": 2.0}, "GSD"),
        ({"BANDS": "1,2,9"}, "band index 9"),
        ({"ENCODER": "/nonexistent/encoder.onnx"}, "/nonexistent/encoder.onnx"),
        ({"APPEND": True}, "APPEND"),
    ],
)
def test_build_rejects_bad_input(provider, tmp_path, ships_raster, tiny_encoder, overrides, named):
    parameters = {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "TILE_SIZE": 32,
        "OUTPUT": str(tmp_path / "index"),
        **overrides,
    }
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("buildindex", parameters)
    assert named in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"OVERLAP_PERCENT": 100}, ["OVERLAP_PERCENT=100", "from 0 to 95", "percent of the tile side"]),
        ({"INPUT_RASTERS": ["/nonexistent/scene.tif"]}, ["INPUT_RASTERS", "/nonexistent/scene.tif", "check the path"]),
        ({"ENCODER": "/nonexistent/encoder.onnx"}, ["ENCODER", "/nonexistent/encoder.onnx", "does not exist"]),
        ({"ENCODER_THREADS": 1000}, ["ENCODER_THREADS=1000"]),
    ],
)
def test_build_names_invalid_value(provider, tmp_path, ships_raster, tiny_encoder, overrides, expected):
    parameters = {
        "INPUT_RASTERS": [ships_raster],
        "ENCODER": tiny_encoder,
        "OUTPUT": str(tmp_path / "index"),
        **overrides,
    }
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("buildindex", parameters)
    message = str(raised.value)
    assert "Incorrect parameter value" not in message
    for text in expected:
        assert text in message
    assert not (tmp_path / "index").exists()


def test_build_rejects_folder_without_index(provider, tmp_path, ships_raster, tiny_encoder):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an index", encoding="utf-8")
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("buildindex", {
            "INPUT_RASTERS": [ships_raster], "ENCODER": tiny_encoder, "OUTPUT": str(folder),
        })
    assert str(folder) in str(raised.value)


def test_build_cancel_writes_no_index(provider, tmp_path, ships_raster, tiny_encoder):
    feedback = QgsProcessingFeedback()
    feedback.cancel()
    folder = tmp_path / "cancelled"
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("buildindex", {
            "INPUT_RASTERS": [ships_raster], "ENCODER": tiny_encoder, "TILE_SIZE": 32, "OUTPUT": str(folder),
        }, feedback)
    assert "cancelled" in str(raised.value)
    assert not (folder / MANIFEST_NAME).exists()


def test_build_reports_missing_package(provider, tmp_path, ships_raster, monkeypatch):
    from lookalike.core import dependencies

    monkeypatch.setattr(dependencies, "missing_packages", lambda names=None: ["hnswlib"])
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("buildindex", {"INPUT_RASTERS": [ships_raster], "OUTPUT": str(tmp_path / "index")})
    message = str(raised.value)
    assert "hnswlib" in message
    assert "Install" in message
    assert "hnswlib==" in message


# -- search ------------------------------------------------------------------------------------


def test_search_output_fields(tiny_index, tiny_encoder):
    folder, _results = tiny_index
    results = run_algorithm("search", {
        "INDEX": folder,
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "ENCODER": tiny_encoder,
        "K": 7,
        "OUTPUT": "memory:",
    })
    layer = output_layer(results)
    assert layer.fields().names() == match_layers.match_fields().names()
    assert layer.crs().authid() == SHIPS_CRS
    features = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])
    assert results["MATCH_COUNT"] == len(features) == 7
    assert [feature["rank"] for feature in features] == list(range(1, 8))
    scores = [feature["score"] for feature in features]
    assert scores == sorted(scores, reverse=True)
    assert results["BEST_SCORE"] == pytest.approx(scores[0])
    assert {feature["encoder"] for feature in features} == {"tiny_test_encoder"}
    for feature in features:
        box = feature.geometry().boundingBox()
        assert box.width() == pytest.approx(160.0)
        assert box.height() == pytest.approx(160.0)
        # In the grid's own CRS a footprint is the tile's rectangle, not a densified ring.
        assert len(list(feature.geometry().vertices())) == 5


def test_search_csv_keeps_footprints_and_types(tiny_index, tiny_encoder, tmp_path):
    folder, _results = tiny_index
    run_algorithm("search", {
        "INDEX": folder,
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "ENCODER": tiny_encoder,
        "K": 3,
        "OUTPUT": str(tmp_path / "matches.csv"),
    })

    layer = QgsVectorLayer(str(tmp_path / "matches.csv"), "matches", "ogr")
    features = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])
    assert len(features) == 3
    assert features[0]["rank"] == 1
    assert features[0].geometry().boundingBox().width() == pytest.approx(160.0)


def test_search_csv_rerun_replaces_own_file(tiny_index, tiny_encoder, tmp_path):
    folder, _results = tiny_index
    parameters = {"INDEX": folder, "POSITIVES": point_layer([SHIP_CENTRES[1]]), "ENCODER": tiny_encoder, "K": 3,
                  "OUTPUT": str(tmp_path / "matches.csv")}
    run_algorithm("search", parameters)

    results = run_algorithm("search", {**parameters, "K": 4})

    assert results["MATCH_COUNT"] == 4


@pytest.mark.parametrize(("output_name", "sidecar_name"), [("m.CSV", "m.csvt"), ("m.csv", "m.prj")])
def test_search_csv_keeps_foreign_sidecar(tiny_index, tiny_encoder, tmp_path, output_name, sidecar_name):
    folder, _results = tiny_index
    sidecar = tmp_path / sidecar_name
    sidecar.write_text("notes of mine\n", encoding="utf-8")

    with pytest.raises(QgsProcessingException, match="which Lookalike did not write"):
        run_algorithm("search", {"INDEX": folder, "POSITIVES": point_layer([SHIP_CENTRES[1]]),
                                 "ENCODER": tiny_encoder, "K": 3, "OUTPUT": str(tmp_path / output_name)})

    assert sidecar.read_text(encoding="utf-8") == "notes of mine\n"


def test_search_csv_keeps_shapefile_crs_file(tiny_index, tiny_encoder, tmp_path):
    folder, _results = tiny_index
    parameters = {"INDEX": folder, "POSITIVES": point_layer([SHIP_CENTRES[1]]), "ENCODER": tiny_encoder, "K": 3}
    run_algorithm("search", {**parameters, "OUTPUT": str(tmp_path / "m.shp")})
    crs_file = (tmp_path / "m.prj").read_bytes()

    with pytest.raises(QgsProcessingException, match="the CRS file that .*m.shp uses too"):
        run_algorithm("search", {**parameters, "OUTPUT": str(tmp_path / "m.csv")})

    assert (tmp_path / "m.prj").read_bytes() == crs_file
    assert not (tmp_path / "m.csv").exists()


def test_search_takes_example_with_crossing_edges(tiny_index, tiny_encoder):
    # QGIS's default "invalid features filtering" stops an algorithm on such a polygon; the
    # search repairs it instead, keeping both lobes.
    folder, _results = tiny_index
    x, y = SHIP_CENTRES[1]
    examples = QgsVectorLayer(f"Polygon?crs={SHIPS_CRS}", "figure eight", "memory")
    feature = QgsFeature()
    corners = [(x - 200, y - 200), (x + 200, y + 200), (x + 200, y - 200), (x - 200, y + 200), (x - 200, y - 200)]
    feature.setGeometry(QgsGeometry.fromWkt("POLYGON((" + ",".join(f"{cx} {cy}" for cx, cy in corners) + "))"))
    examples.dataProvider().addFeatures([feature])
    assert not feature.geometry().isGeosValid()

    results = run_algorithm("search", {
        "INDEX": folder, "POSITIVES": examples, "ENCODER": tiny_encoder, "K": 3, "OUTPUT": "memory:",
    })

    assert results["MATCH_COUNT"] == 3


def test_search_names_example_without_area(tiny_index, tiny_encoder):
    folder, _results = tiny_index
    x, y = SHIP_CENTRES[1]
    examples = polygon_layer([(x - 100, y - 100, x + 100, y + 100)], name="examples")
    line = QgsFeature()
    line.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({x} {y},{x + 50} {y + 50},{x + 100} {y + 100},{x} {y}))"))
    examples.dataProvider().addFeatures([line])

    with pytest.raises(QgsProcessingException, match="Feature 2 of POSITIVES: The query polygon encloses no area"):
        run_algorithm("search", {
            "INDEX": folder, "POSITIVES": examples, "ENCODER": tiny_encoder, "K": 3, "OUTPUT": "memory:",
        })


def test_search_min_score_and_negatives(tiny_index, tiny_encoder, ships_raster):
    folder, _results = tiny_index
    results = run_algorithm("search", {
        "INDEX": folder,
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "NEGATIVES": point_layer([(558000.0, 4175500.0)], name="water"),
        "RASTER": ships_raster,
        "ENCODER": tiny_encoder,
        "K": 50,
        "MIN_SCORE": 0.9,
        "MAX_OVERLAP": 1.0,
        "STRATEGY": 1,
        "OUTPUT": "memory:",
    })
    layer = output_layer(results)
    scores = [feature["score"] for feature in layer.getFeatures()]
    assert all(score >= 0.9 for score in scores)
    assert results["MATCH_COUNT"] == len(scores) < 50
    queries = {feature["query"] for feature in layer.getFeatures()}
    assert all("counter-example" in query for query in queries)


def test_negative_same_as_positive_warned(tiny_index, tiny_encoder):
    folder, _results = tiny_index
    feedback = RecordingFeedback()

    run_algorithm("search", {
        "INDEX": folder,
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "NEGATIVES": point_layer([SHIP_CENTRES[1]], name="same ship"),
        "ENCODER": tiny_encoder,
        "OUTPUT": "memory:",
    }, feedback)

    assert any("look like the positive ones" in text and "STRATEGY max" in text for text in feedback.warnings)


def test_max_negative_same_as_positive_warned(tiny_index, tiny_encoder):
    folder, _results = tiny_index
    feedback = RecordingFeedback()

    run_algorithm("search", {
        "INDEX": folder,
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "NEGATIVES": point_layer([SHIP_CENTRES[1]], name="same ship"),
        "ENCODER": tiny_encoder,
        "STRATEGY": 1,
        "OUTPUT": "memory:",
    }, feedback)

    assert any("with the max strategy they lower every positive score" in text for text in feedback.warnings)


@pytest.mark.parametrize(
    ("overlap_parameters", "explained", "left_out"),
    [
        ({}, "MAX_OVERLAP 0.25", None),
        ({"MAX_OVERLAP": 1}, "tiles under an example are never returned", "Raise MAX_OVERLAP"),
    ],
)
def test_fewer_than_k_explained(tiny_index, tiny_encoder, overlap_parameters, explained, left_out):
    folder, _results = tiny_index
    feedback = RecordingFeedback()

    results = run_algorithm("search", {
        "INDEX": folder,
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "ENCODER": tiny_encoder,
        "K": 10000,
        "OUTPUT": "memory:",
        **overlap_parameters,
    }, feedback)

    found = results["MATCH_COUNT"]
    assert 0 < found < 10000
    fewer_warnings = [text for text in feedback.warnings if f"found {found} of the K=10000 matches asked for" in text]
    assert fewer_warnings, feedback.warnings
    assert explained in fewer_warnings[0]
    if left_out is not None:
        assert left_out not in fewer_warnings[0]


def test_search_rejects_missing_index(provider, tmp_path):
    missing = tmp_path / "no_index_here"
    missing.mkdir()
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("search", {
            "INDEX": str(missing), "POSITIVES": point_layer([SHIP_CENTRES[0]]), "OUTPUT": "memory:",
        })
    assert str(missing) in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"K": 0}, ["K=0", "at least 1", "maximum number of matches"]),
        ({"MAX_OVERLAP": 25}, ["MAX_OVERLAP=25", "from 0 to 1", "not a percentage"]),
        ({"MIN_SCORE": 5}, ["MIN_SCORE=5", "from -2 to 1"]),
        ({"RASTER": "/nonexistent/query.tif"}, ["RASTER", "/nonexistent/query.tif", "check the path"]),
    ],
)
def test_search_names_invalid_value(tiny_index, tiny_encoder, overrides, expected):
    folder, _results = tiny_index
    parameters = {
        "INDEX": folder, "POSITIVES": point_layer([SHIP_CENTRES[0]]), "ENCODER": tiny_encoder, "OUTPUT": "memory:",
        **overrides,
    }
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("search", parameters)
    message = str(raised.value)
    assert "Incorrect parameter value" not in message
    for text in expected:
        assert text in message


def test_search_rejects_empty_examples(tiny_index, tiny_encoder):
    folder, _results = tiny_index
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("search", {
            "INDEX": folder, "POSITIVES": point_layer([]), "ENCODER": tiny_encoder, "OUTPUT": "memory:",
        })
    assert "POSITIVES" in str(raised.value)


def test_search_uses_index_encoder(tiny_index):
    folder, _results = tiny_index
    results = run_algorithm(
        "search", {"INDEX": folder, "POSITIVES": point_layer([SHIP_CENTRES[0]]), "OUTPUT": "memory:"}
    )
    assert {feature["encoder"] for feature in output_layer(results).getFeatures()} == {"tiny_test_encoder"}


def test_search_rejects_other_encoder(tiny_index):
    from lookalike.core.encoder import default_model_path

    folder, _results = tiny_index
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("search", {
            "INDEX": folder,
            "POSITIVES": point_layer([SHIP_CENTRES[0]]),
            "ENCODER": str(default_model_path()),
            "OUTPUT": "memory:",
        })
    assert "tiny_test_encoder" in str(raised.value)


def test_search_finds_other_ships(provider, tmp_path, ships_raster):
    """With the bundled encoder, a query on one ship ranks tiles over the other ships first."""
    folder = tmp_path / "ships"
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [ships_raster], "TILE_SIZE": 32, "OVERLAP_PERCENT": 50, "OUTPUT": str(folder),
    })
    results = run_algorithm("search", {
        "INDEX": str(folder),
        "POSITIVES": point_layer([SHIP_CENTRES[1]]),
        "K": 2,
        "MAX_OVERLAP": 0.0,
        "OUTPUT": str(tmp_path / "matches.gpkg"),
    })
    layer = output_layer(results)
    other_ships = [QgsPointXY(x, y) for x, y in (SHIP_CENTRES[0], SHIP_CENTRES[2], SHIP_CENTRES[3])]
    for feature in layer.getFeatures():
        footprint = feature.geometry()
        assert any(footprint.contains(QgsGeometry.fromPointXY(centre)) or
                   footprint.distance(QgsGeometry.fromPointXY(centre)) < 40.0 for centre in other_ships), (
            f"match rank {feature['rank']} at {footprint.boundingBox().toString()} is not over a ship"
        )
    assert layer.featureCount() == 2


# -- exportchips -------------------------------------------------------------------------------


def test_export_geotiff_chips(tiny_index, tiny_encoder, tmp_path):
    folder, _results = tiny_index
    search = run_algorithm("search", {
        "INDEX": folder, "POSITIVES": point_layer([SHIP_CENTRES[1]]), "ENCODER": tiny_encoder, "K": 4,
        "OUTPUT": str(tmp_path / "matches.gpkg"),
    })
    results = run_algorithm("exportchips", {"INPUT": search["OUTPUT"], "OUTPUT": str(tmp_path / "chips")})
    assert results["CHIP_COUNT"] == 4
    assert results["SKIPPED_COUNT"] == 0
    with open(results["LABELS_CSV"], newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4]
    assert {row["label"] for row in rows} == {"match"}
    for row in rows:
        chip = gdal.Open(str(tmp_path / "chips" / row["chip"]))
        assert chip.RasterCount == 4
        # 160 m tiles of 5 m pixels read at native resolution.
        assert (chip.RasterXSize, chip.RasterYSize) == (32, 32)
        origin_x, pixel_width, _, origin_y, _, pixel_height = chip.GetGeoTransform()
        assert origin_x == pytest.approx(float(row["xmin"]))
        assert origin_y == pytest.approx(float(row["ymax"]))
        assert pixel_width == pytest.approx(5.0)
        assert pixel_height == pytest.approx(-5.0)


def test_export_names_moved_raster(provider, tiny_encoder, tmp_path, ships_raster):
    raster = tmp_path / "ships.tif"
    shutil.copyfile(ships_raster, raster)
    run_algorithm("buildindex", {
        "INPUT_RASTERS": [str(raster)], "ENCODER": tiny_encoder, "TILE_SIZE": 32, "OUTPUT": str(tmp_path / "index"),
    })
    search = run_algorithm("search", {
        "INDEX": str(tmp_path / "index"), "POSITIVES": point_layer([SHIP_CENTRES[1]]), "ENCODER": tiny_encoder,
        "K": 2, "OUTPUT": str(tmp_path / "matches.gpkg"),
    })
    raster.rename(tmp_path / "ships_moved.tif")

    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("exportchips", {"INPUT": search["OUTPUT"], "OUTPUT": str(tmp_path / "chips")})

    assert f"The raster {raster} of feature" in str(raised.value)
    assert "is not found: it was moved, renamed or deleted after the search" in str(raised.value)


def test_export_png_chips_with_size(provider, tmp_path, ships_raster):
    inside = (558505.0, 4176040.0, 558665.0, 4176200.0)
    off_raster = (600000.0, 4100000.0, 600160.0, 4100160.0)
    footprints = polygon_layer([inside, off_raster])
    results = run_algorithm("exportchips", {
        "INPUT": footprints,
        "RASTER": ships_raster,
        "FORMAT": 1,
        "CHIP_SIZE_PX": 64,
        "LABEL": "ship",
        "OUTPUT": str(tmp_path / "png"),
    })
    assert results["CHIP_COUNT"] == 1
    assert results["SKIPPED_COUNT"] == 1
    chip = gdal.Open(str(tmp_path / "png" / "chip_00001.png"))
    assert (chip.RasterXSize, chip.RasterYSize, chip.RasterCount) == (64, 64, 4)
    with open(results["LABELS_CSV"], newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["label"] for row in rows] == ["ship"]
    assert rows[0]["crs"] == SHIPS_CRS


def test_second_export_removes_earlier_chips(provider, tmp_path, ships_raster):
    footprints = [(558505.0 + 200.0 * number, 4176040.0, 558665.0 + 200.0 * number, 4176200.0) for number in range(3)]
    folder = tmp_path / "chips"
    run_algorithm("exportchips", {"INPUT": polygon_layer(footprints), "RASTER": ships_raster, "OUTPUT": str(folder)})
    analysts_file = folder / "chip_notes.txt"
    analysts_file.write_text("kept", encoding="utf-8")
    unlisted_chip = folder / "chip_00009.tif"
    unlisted_chip.write_bytes(b"not from an export")

    results = run_algorithm("exportchips", {
        "INPUT": polygon_layer(footprints[:1]), "RASTER": ships_raster, "OUTPUT": str(folder),
    })

    assert results["CHIP_COUNT"] == 1
    assert sorted(path.name for path in folder.iterdir()) == [
        "chip_00001.tif", "chip_00009.tif", "chip_notes.txt", "labels.csv",
    ]


def test_export_into_checkpoint_name_leaves_no_folder(provider, tmp_path, ships_raster):
    (tmp_path / "ships_index").mkdir()

    with pytest.raises(QgsProcessingException, match="checkpoint folder of builds into"):
        run_algorithm("exportchips", {
            "INPUT": polygon_layer([(558505.0, 4176040.0, 558665.0, 4176200.0)]),
            "RASTER": ships_raster,
            "OUTPUT": str(tmp_path / "ships_index.partial"),
        })

    assert not (tmp_path / "ships_index.partial").exists()


def test_export_into_checkpoints_of_interrupted_first_build_refused(provider, tmp_path, ships_raster):
    checkpoints = tmp_path / "harbour_index.partial"
    checkpoints.mkdir()
    (checkpoints / "partial_build.json").write_text(json.dumps(
        {"format": "lookalike-partial-build", "format_version": 1, "build_id": "an interrupted build"}))

    with pytest.raises(QgsProcessingException, match="is the checkpoint folder of an interrupted Lookalike build"):
        run_algorithm("exportchips", {
            "INPUT": polygon_layer([(558505.0, 4176040.0, 558665.0, 4176200.0)]),
            "RASTER": ships_raster,
            "OUTPUT": str(checkpoints),
        })

    assert sorted(path.name for path in checkpoints.iterdir()) == ["partial_build.json"]


def test_export_needs_raster_without_source_field(provider, tmp_path):
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("exportchips", {
            "INPUT": polygon_layer([(558505.0, 4176040.0, 558665.0, 4176200.0)], name="drawn"),
            "OUTPUT": str(tmp_path / "chips"),
        })
    assert "'source'" in str(raised.value)
    assert "pass RASTER, the raster to read the chips from" in str(raised.value)


# -- indexinfo ---------------------------------------------------------------------------------


def test_indexinfo_reports_manifest(tiny_index, tmp_path, ships_raster):
    folder, build_results = tiny_index
    results = run_algorithm("indexinfo", {
        "INDEX": folder,
        "OUTPUT_HTML": str(tmp_path / "info.html"),
        "OUTPUT_JSON": str(tmp_path / "manifest.json"),
    })
    assert results["TILE_COUNT"] == build_results["TILES_EMBEDDED"]
    assert results["SOURCE_COUNT"] == 1
    assert results["SOURCE_PATHS"] == os.path.abspath(ships_raster)
    assert results["ENCODER_NAME"] == "tiny_test_encoder"
    assert results["EMBEDDING_DIM"] == 16
    assert results["TILE_SIZE_PX"] == 32
    assert results["STRIDE_PX"] == 32
    assert results["GSD"] == pytest.approx(5.0)
    assert results["TILE_GROUND_SIZE"] == pytest.approx(160.0)
    assert results["GRID_CRS"].startswith(SHIPS_CRS)
    assert "tiny_test_encoder" in Path(results["OUTPUT_HTML"]).read_text(encoding="utf-8")
    written = json.loads(Path(results["OUTPUT_JSON"]).read_text(encoding="utf-8"))
    assert written["tile_count"] == results["TILE_COUNT"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_indexinfo_warns_about_missing_and_changed_rasters(provider, tiny_encoder, tmp_path, ships_raster):
    edited, removed = tmp_path / "edited.tif", tmp_path / "removed.tif"
    shutil.copyfile(ships_raster, edited)
    gdal.Translate(str(removed), ships_raster, srcWin=[0, 0, 300, 300])
    folder = tmp_path / "index"
    run_algorithm("buildindex", {"INPUT_RASTERS": [str(edited), str(removed)], "ENCODER": tiny_encoder,
                                 "TILE_SIZE": 32, "OUTPUT": str(folder)})
    removed.unlink()
    dataset = gdal.Open(str(edited), gdal.GA_Update)
    band = dataset.GetRasterBand(1)
    band.WriteArray(255 - band.ReadAsArray())
    dataset = band = None
    feedback = RecordingFeedback()

    run_algorithm("indexinfo", {"INDEX": str(folder)}, feedback)

    assert any(f"Raster {removed} of this index is missing" in text for text in feedback.warnings), feedback.warnings
    assert any(f"Raster {edited} changed after it was indexed" in text for text in feedback.warnings)


def test_indexinfo_output_in_missing_folder_named(tiny_index, tmp_path):
    folder, _results = tiny_index
    missing = tmp_path / "reports" / "2026"

    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("indexinfo", {"INDEX": folder, "OUTPUT_HTML": str(missing / "index.html")})

    assert f"OUTPUT_HTML: the folder {missing} does not exist" in str(raised.value)


def test_indexinfo_outputs_readable_by_others(tiny_index, tmp_path):
    folder, _ = tiny_index
    previous_umask = os.umask(0o022)
    try:
        results = run_algorithm("indexinfo", {"INDEX": folder, "OUTPUT_HTML": str(tmp_path / "info.html")})
    finally:
        os.umask(previous_umask)

    assert os.stat(results["OUTPUT_HTML"]).st_mode & 0o777 == 0o644


def test_indexinfo_of_unfinished_first_build_says_so(provider, tmp_path):
    (tmp_path / "harbour_index.partial").mkdir()

    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("indexinfo", {"INDEX": str(tmp_path / "harbour_index")})

    assert "does not exist yet: a build into it is running or was interrupted" in str(raised.value)


def test_indexinfo_rejects_missing_folder(provider, tmp_path):
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("indexinfo", {"INDEX": str(tmp_path / "missing")})
    assert "missing" in str(raised.value)
