"""Match layers: the shared schema, CRS transforms, GeoPackage writing and the map image."""

import pytest
from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QImage

from lookalike.core.errors import LookalikeError
from lookalike.core.search import Match
from lookalike.gis import matches as matches_module
from lookalike.gis.map_render import query_outline_layer, render_map_png
from lookalike.gis.matches import (
    free_layer_name,
    match_fields,
    matches_to_features,
    matches_to_memory_layer,
    write_matches,
)

UTM_10N = QgsCoordinateReferenceSystem("EPSG:32610")
WEB_MERCATOR = QgsCoordinateReferenceSystem("EPSG:3857")
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
SAMPLE_RASTER_NAME = "1056417_2017-03-08_RE3_3A_Visual_clip.tif"


def make_match(rank, bounds, crs, score=None, source_path="/data/scene.tif", row=3, col=7):
    return Match(
        rank=rank,
        score=0.9 - 0.1 * rank if score is None else score,
        tile_id=100 + rank,
        source_id=0,
        row=row,
        col=col,
        bounds=bounds,
        crs_wkt=crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED),
        source_path=source_path,
    )


@pytest.fixture()
def utm_matches():
    return [
        make_match(1, (557700.0, 4176100.0, 558020.0, 4176420.0), UTM_10N),
        make_match(2, (558500.0, 4175900.0, 558820.0, 4176220.0), UTM_10N, row=4, col=9),
    ]


def test_match_fields_schema():
    fields = match_fields()

    assert fields.names() == ["rank", "score", "tile_id", "source", "row", "col", "encoder", "query"]
    assert fields.field("rank").type() == QVariant.Int
    assert fields.field("score").type() == QVariant.Double
    assert fields.field("tile_id").type() == QVariant.LongLong
    assert fields.field("source").type() == QVariant.String


def test_features_carry_match_attributes(utm_matches):
    features = matches_to_features(utm_matches, match_fields(), UTM_10N, encoder_name="tiny", query_label="box")

    assert len(features) == 2
    first = features[0]
    assert first["rank"] == 1
    assert first["score"] == pytest.approx(0.8)
    assert first["tile_id"] == 101
    assert first["source"] == "/data/scene.tif"
    assert (first["row"], first["col"]) == (3, 7)
    assert first["encoder"] == "tiny"
    assert first["query"] == "box"
    bounding_box = first.geometry().boundingBox()
    assert bounding_box.xMinimum() == pytest.approx(557700.0)
    assert bounding_box.yMaximum() == pytest.approx(4176420.0)


def test_features_are_transformed_to_destination_crs(utm_matches):
    features = matches_to_features(utm_matches, match_fields(), WGS84)

    to_wgs84 = QgsCoordinateTransform(UTM_10N, WGS84, QgsProject.instance())
    expected_centre = to_wgs84.transform(QgsPointXY(557860.0, 4176260.0))
    centre = features[0].geometry().centroid().asPoint()
    assert centre.x() == pytest.approx(expected_centre.x(), abs=1e-6)
    assert centre.y() == pytest.approx(expected_centre.y(), abs=1e-6)
    # San Francisco Bay, so the transform really ran.
    assert -123.0 < centre.x() < -122.0
    assert 37.0 < centre.y() < 38.0


def test_memory_layer_mixes_source_crs():
    to_mercator = QgsCoordinateTransform(UTM_10N, WEB_MERCATOR, QgsProject.instance())
    mercator_box = to_mercator.transformBoundingBox(QgsRectangle(558500.0, 4175900.0, 558820.0, 4176220.0))
    matches = [
        make_match(1, (557700.0, 4176100.0, 558020.0, 4176420.0), UTM_10N),
        make_match(2, (mercator_box.xMinimum(), mercator_box.yMinimum(), mercator_box.xMaximum(),
                       mercator_box.yMaximum()), WEB_MERCATOR),
    ]

    layer = matches_to_memory_layer(matches, "mixed", UTM_10N)

    assert layer.isValid()
    assert layer.crs().authid() == "EPSG:32610"
    assert layer.featureCount() == 2
    second = next(feature for feature in layer.getFeatures() if feature["rank"] == 2)
    centre = second.geometry().centroid().asPoint()
    assert centre.x() == pytest.approx(558660.0, abs=2.0)
    assert centre.y() == pytest.approx(4176060.0, abs=2.0)


def test_memory_layer_defaults_to_first_match_crs(utm_matches):
    layer = matches_to_memory_layer(utm_matches)

    assert layer.crs().authid() == "EPSG:32610"
    assert layer.name() == "Lookalike matches"


def test_empty_memory_layer_is_valid():
    layer = matches_to_memory_layer([], "none")

    assert layer.isValid()
    assert layer.featureCount() == 0
    assert layer.fields().names() == match_fields().names()


def test_write_geopackage_round_trip(utm_matches, tmp_path):
    layer = matches_to_memory_layer(utm_matches, "matches", UTM_10N, encoder_name="tiny", query_label="box")
    path = tmp_path / "matches.gpkg"

    written = write_matches(layer, path)

    reopened = QgsVectorLayer(f"{written}|layername=matches", "reopened", "ogr")
    assert reopened.isValid()
    assert reopened.featureCount() == 2
    assert reopened.crs().authid() == "EPSG:32610"
    for name in match_fields().names():
        assert reopened.fields().indexOf(name) >= 0
    ranks = sorted(feature["rank"] for feature in reopened.getFeatures())
    assert ranks == [1, 2]


def test_write_rejects_existing_file(utm_matches, tmp_path):
    path = tmp_path / "matches.gpkg"
    path.write_bytes(b"user data")
    layer = matches_to_memory_layer(utm_matches, "matches", UTM_10N)

    with pytest.raises(LookalikeError, match="already exists"):
        write_matches(layer, path)

    assert path.read_bytes() == b"user data"


def test_write_rejects_existing_shapefile_table(utm_matches, tmp_path):
    table = tmp_path / "matches.dbf"
    table.write_bytes(b"user table")
    layer = matches_to_memory_layer(utm_matches, "matches", UTM_10N)

    with pytest.raises(LookalikeError, match=f"{table} already exists"):
        write_matches(layer, tmp_path / "matches.shp")

    assert table.read_bytes() == b"user table"
    assert not (tmp_path / "matches.shp").exists()


@pytest.mark.parametrize(("first", "second"), [("m.shp", "m.csv"), ("m.csv", "m.shp")])
def test_write_keeps_crs_file_of_other_format(utm_matches, tmp_path, first, second):
    write_matches(matches_to_memory_layer(utm_matches, "matches", UTM_10N), tmp_path / first)
    crs_file = (tmp_path / "m.prj").read_bytes()
    in_wgs84 = matches_to_memory_layer(utm_matches, "matches", WGS84)

    with pytest.raises(LookalikeError, match=f"m.prj, the CRS file that {tmp_path / first} uses too"):
        write_matches(in_wgs84, tmp_path / second, overwrite=True)

    assert (tmp_path / "m.prj").read_bytes() == crs_file
    assert not (tmp_path / second).exists()


def test_write_shapefile_beside_csv_without_crs_file(utm_matches, tmp_path):
    users_csv = tmp_path / "m.csv"
    users_csv.write_text("WKT,name\n\"POINT (1 2)\",well\n", encoding="utf-8")

    with pytest.raises(LookalikeError, match=f"the CRS file that {users_csv} uses too"):
        write_matches(matches_to_memory_layer(utm_matches, "matches", UTM_10N), tmp_path / "m.shp", overwrite=True)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.csv"]


def raster_geopackage(path, table: str) -> None:
    driver = gdal.GetDriverByName("MEM")
    raster = driver.Create("", 8, 8, 1, gdal.GDT_Byte)
    raster.SetGeoTransform((558000.0, 10.0, 0.0, 4176000.0, 0.0, -10.0))
    raster.SetProjection(UTM_10N.toWkt())
    gdal.Translate(str(path), raster, format="GPKG", creationOptions=[f"RASTER_TABLE={table}"])


def test_add_to_raster_geopackage_avoids_table_names(utm_matches, tmp_path):
    path = tmp_path / "ortho.gpkg"
    raster_geopackage(path, "Matches")

    assert free_layer_name(path, "matches") == "matches_2"
    write_matches(matches_to_memory_layer(utm_matches, "m", UTM_10N), path, layer_name="matches_2", add_to_file=True)

    assert QgsVectorLayer(f"{path}|layername=matches_2", "added", "ogr").featureCount() == 2
    assert gdal.Open(str(path)).RasterXSize == 8


def test_add_to_file_keeps_other_layers(utm_matches, tmp_path):
    path = tmp_path / "project.gpkg"
    write_matches(matches_to_memory_layer(utm_matches, "first", UTM_10N), path)
    second = matches_to_memory_layer(utm_matches[:1], "second", UTM_10N)

    write_matches(second, path, layer_name="second", add_to_file=True)

    assert QgsVectorLayer(f"{path}|layername=first", "first", "ogr").featureCount() == 2
    assert QgsVectorLayer(f"{path}|layername=second", "second", "ogr").featureCount() == 1
    with pytest.raises(LookalikeError, match="already has a layer 'SECOND'"):
        write_matches(second, path, layer_name="SECOND", add_to_file=True)
    assert free_layer_name(path, "second") == "second_2"


def test_failed_add_leaves_no_partial_layer(utm_matches, tmp_path, monkeypatch):
    path = tmp_path / "project.gpkg"
    write_matches(matches_to_memory_layer(utm_matches, "first", UTM_10N), path)
    real_writer = matches_module._run_vector_writer

    def writer_stopping_half_way(*args, **kwargs):
        real_writer(*args, **kwargs)
        return QgsVectorFileWriter.ErrFeatureWriteFailed, "No space left on device"

    monkeypatch.setattr(matches_module, "_run_vector_writer", writer_stopping_half_way)

    with pytest.raises(LookalikeError, match="No space left on device"):
        write_matches(matches_to_memory_layer(utm_matches, "second", UTM_10N), path, layer_name="second",
                      add_to_file=True)

    dataset = gdal.OpenEx(str(path), gdal.OF_VECTOR)
    assert [dataset.GetLayer(position).GetName() for position in range(dataset.GetLayerCount())] == ["first"]


def test_write_overwrite_replaces_file(utm_matches, tmp_path):
    path = tmp_path / "matches.gpkg"
    first = matches_to_memory_layer(utm_matches, "matches", UTM_10N)
    write_matches(first, path)
    second = matches_to_memory_layer(utm_matches[:1], "matches", UTM_10N)

    write_matches(second, path, overwrite=True)

    reopened = QgsVectorLayer(f"{path}|layername=matches", "reopened", "ogr")
    assert reopened.featureCount() == 1


def test_write_geojson_by_extension(utm_matches, tmp_path):
    layer = matches_to_memory_layer(utm_matches, "matches", UTM_10N)

    path = write_matches(layer, tmp_path / "matches.geojson")

    assert QgsVectorLayer(str(path), "reopened", "ogr").featureCount() == 2


def test_write_unknown_extension_is_rejected(utm_matches, tmp_path):
    layer = matches_to_memory_layer(utm_matches, "matches", UTM_10N)

    with pytest.raises(LookalikeError, match="names no vector format"):
        write_matches(layer, tmp_path / "matches.unknown")


def test_invalid_match_crs_is_rejected(tmp_path):
    match = make_match(1, (0.0, 0.0, 1.0, 1.0), UTM_10N)
    broken = Match(**{**match.__dict__, "crs_wkt": "not a crs"})

    with pytest.raises(LookalikeError, match="CRS that QGIS cannot read"):
        matches_to_features([broken], match_fields(), UTM_10N)


def test_render_map_png(utm_matches, repo_root, tmp_path):
    raster = QgsRasterLayer(str(repo_root / "sample_data" / SAMPLE_RASTER_NAME), "clip")
    layer = matches_to_memory_layer(utm_matches, "matches", UTM_10N)
    query = query_outline_layer([(557670.0, 4176095.0, 557780.0, 4176355.0)], UTM_10N)
    path = tmp_path / "map.png"

    render_map_png(raster, path, match_layer=layer, query_layer=query, size_px=(700, 350))

    image = QImage(str(path))
    assert (image.width(), image.height()) == (700, 350)
    with pytest.raises(LookalikeError, match="already exists"):
        render_map_png(raster, path, match_layer=layer)
