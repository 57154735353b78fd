"""The dock's query and results state: export paths, removed result layers, marks of another
index, query parts that a search rejects, and searches that can be cancelled.

Runs the real dock offscreen on the RapidEye clip with the tiny test encoder.
"""

import json
import shutil
from pathlib import Path

import pytest
from dock_testing import build, drag_rectangle, messages, ship_query_bounds, wait_for_tasks, wait_until
from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QFileDialog, QMessageBox

from lookalike.core.pipeline import BuildParameters, build_index
from lookalike.gis import matches as match_fields
from lookalike.ui.result_layer import RESULTS_PROPERTY
from lookalike.ui.results import Relevance


def search_box(dock, canvas, bounds) -> None:
    dock.activate_tool("rectangle")
    drag_rectangle(canvas, bounds)
    wait_for_tasks(dock)


@pytest.fixture()
def searched(dock, ships_layer, qgis_canvas, tmp_path):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    dock.k_spin.setValue(3)
    search_box(dock, qgis_canvas, ship_query_bounds(ships_layer))
    assert dock.result_layer() is not None
    return dock


def answer_no(monkeypatch) -> list:
    questions = []

    def question(_parent, _title, text, *_args):
        questions.append(text)
        return QMessageBox.StandardButton.No

    monkeypatch.setattr(QMessageBox, "question", question)
    return questions


# -- export ------------------------------------------------------------------------------------


def test_export_asks_before_replacing_extension(searched, tmp_path, monkeypatch):
    users_file = tmp_path / "report.geojson"
    users_file.write_text('{"type": "FeatureCollection", "name": "my own survey", "features": []}')
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "report"), ""))
    questions = answer_no(monkeypatch)
    searched.export_format_combo.setCurrentText("GeoJSON")

    QTest.mouseClick(searched.export_button, Qt.MouseButton.LeftButton)

    assert len(questions) == 1
    assert str(users_file) in questions[0]
    assert "my own survey" in users_file.read_text()

    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    QTest.mouseClick(searched.export_button, Qt.MouseButton.LeftButton)
    assert "my own survey" not in users_file.read_text()
    assert QgsVectorLayer(str(users_file), "export", "ogr").featureCount() == 3


def test_export_asks_before_replacing_shapefile_table(searched, tmp_path, monkeypatch):
    users_table = tmp_path / "roads.dbf"
    users_table.write_bytes(b"user dbf")
    # The file dialog confirms only the .shp name, which does not exist yet.
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "roads.shp"), ""))
    questions = answer_no(monkeypatch)
    searched.export_format_combo.setCurrentText("ESRI Shapefile")

    QTest.mouseClick(searched.export_button, Qt.MouseButton.LeftButton)

    assert len(questions) == 1
    assert str(users_table) in questions[0]
    assert users_table.read_bytes() == b"user dbf"
    assert not (tmp_path / "roads.shp").exists()

    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    QTest.mouseClick(searched.export_button, Qt.MouseButton.LeftButton)
    assert QgsVectorLayer(str(tmp_path / "roads.shp"), "export", "ogr").featureCount() == 3


def test_csv_export_keeps_shapefile_crs(searched, qgis_iface, tmp_path, monkeypatch):
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "ships.shp"), ""))
    searched.export_format_combo.setCurrentText("ESRI Shapefile")
    searched.export_layer_with_dialog()
    shapefile_crs = (tmp_path / "ships.prj").read_text()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "ships.csv"), ""))
    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    searched.export_format_combo.setCurrentText("CSV")

    searched.export_layer_with_dialog()

    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("ships.prj" in text and "ships.shp" in text for text in warnings), warnings
    assert not (tmp_path / "ships.csv").exists()
    assert (tmp_path / "ships.prj").read_text() == shapefile_crs


def users_geopackage(path: Path) -> None:
    roads = QgsVectorLayer("LineString?crs=EPSG:32610&field=name:string", "my_roads", "memory")
    feature = QgsFeature(roads.fields())
    feature.setGeometry(QgsGeometry.fromWkt("LINESTRING(558300 4175000, 558400 4175100)"))
    feature.setAttribute("name", "harbour road")
    roads.dataProvider().addFeatures([feature])
    match_fields.write_matches(roads, path, driver_name="GPKG")


def geopackage_layers(path: Path) -> list:
    dataset = match_fields.open_dataset_quietly(path)
    return sorted(dataset.GetLayer(position).GetName() for position in range(dataset.GetLayerCount()))


def test_export_adds_layer_to_users_geopackage(searched, tmp_path, monkeypatch):
    target = tmp_path / "project_data.gpkg"
    users_geopackage(target)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(target), ""))
    searched.export_format_combo.setCurrentText("GeoPackage")
    questions = answer_no(monkeypatch)

    searched.export_layer_with_dialog()

    assert len(questions) == 1
    assert "my_roads" in questions[0]
    assert geopackage_layers(target) == ["my_roads"]

    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    searched.export_layer_with_dialog()

    result_name = searched.result_layer().name()
    assert geopackage_layers(target) == sorted(["my_roads", result_name])
    assert QgsVectorLayer(f"{target}|layername={result_name}", "export", "ogr").featureCount() == 3
    assert QgsVectorLayer(f"{target}|layername=my_roads", "roads", "ogr").featureCount() == 1


def test_export_offers_layer_in_raster_geopackage(searched, tmp_path, monkeypatch):
    target = tmp_path / "ortho.gpkg"
    raster = gdal.GetDriverByName("MEM").Create("", 8, 8, 1, gdal.GDT_Byte)
    raster.SetGeoTransform((558000.0, 10.0, 0.0, 4176000.0, 0.0, -10.0))
    raster.SetProjection(QgsCoordinateReferenceSystem("EPSG:32610").toWkt())
    gdal.Translate(str(target), raster, format="GPKG", creationOptions=["RASTER_TABLE=ortho"])
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(target), ""))
    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    searched.export_format_combo.setCurrentText("GeoPackage")

    searched.export_layer_with_dialog()

    assert gdal.Open(str(target)).RasterXSize == 8
    name = searched.result_layer().name()
    assert QgsVectorLayer(f"{target}|layername={name}", "export", "ogr").featureCount() == 3


def test_export_keeps_unreadable_geopackage(searched, qgis_iface, tmp_path, monkeypatch):
    target = tmp_path / "notes.gpkg"
    target.write_text("not a GeoPackage", encoding="utf-8")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(target), ""))
    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    searched.export_format_combo.setCurrentText("GeoPackage")

    searched.export_layer_with_dialog()

    assert target.read_text(encoding="utf-8") == "not a GeoPackage"
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("cannot be read as a GeoPackage" in text for text in warnings), warnings


def test_export_message_ignores_threshold_for_deleted(searched, qgis_iface, tmp_path):
    layer = searched.result_layer()
    layer.startEditing()
    layer.deleteFeature(next(layer.getFeatures()).id())
    layer.commitChanges()

    searched.export_layer(str(tmp_path / "after_delete.gpkg"))

    exported = [text for text in messages(qgis_iface, Qgis.MessageLevel.Success) if "Exported" in text]
    assert len(exported) == 1
    assert exported[0].endswith(f"Exported 2 matches to {tmp_path / 'after_delete.gpkg'}.")


def test_export_to_folder_rejected(searched, qgis_iface, tmp_path, monkeypatch):
    (tmp_path / "matches.gpkg").mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "matches"), ""))
    searched.export_format_combo.setCurrentText("GeoPackage")

    searched.export_layer_with_dialog()

    errors = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("is a folder" in text for text in errors), errors
    assert (tmp_path / "matches.gpkg").is_dir()


def test_shapefile_export_names_raster_of_its_prj(searched, tmp_path, monkeypatch):
    (tmp_path / "scene.asc").write_text("ncols 1\nnrows 1\nxllcorner 0\nyllcorner 0\ncellsize 1\n7\n")
    (tmp_path / "scene.prj").write_text("PROJCS[the grid's CRS]")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "scene.shp"), ""))
    questions = answer_no(monkeypatch)
    searched.export_format_combo.setCurrentText("ESRI Shapefile")

    QTest.mouseClick(searched.export_button, Qt.MouseButton.LeftButton)

    assert len(questions) == 1
    assert "scene.prj may also be the CRS of scene.asc" in questions[0]
    assert (tmp_path / "scene.prj").read_text() == "PROJCS[the grid's CRS]"


def test_export_into_checkpoints_of_interrupted_build_refused(searched, tmp_path, monkeypatch, qgis_iface):
    checkpoints = tmp_path / "harbour_index.partial"
    checkpoints.mkdir()
    (checkpoints / "partial_build.json").write_text(json.dumps(
        {"format": "lookalike-partial-build", "format_version": 1, "build_id": "an interrupted build"}))
    target = checkpoints / "my matches.gpkg"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(target), ""))

    QTest.mouseClick(searched.export_button, Qt.MouseButton.LeftButton)

    assert not target.exists()
    errors = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("is inside the checkpoint folder of an interrupted Lookalike build" in text for text in errors), errors


def test_chip_export_into_index_folder_refused(searched, monkeypatch, qgis_iface):
    index_folder = Path(searched.index.folder)
    files_before = sorted(path.name for path in index_folder.iterdir())
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *args, **kwargs: str(index_folder))
    questions = answer_no(monkeypatch)

    QTest.mouseClick(searched.export_chips_button, Qt.MouseButton.LeftButton)

    assert questions == []
    assert sorted(path.name for path in index_folder.iterdir()) == files_before
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("is a Lookalike index folder" in text for text in warnings), warnings


# -- result layer and marks --------------------------------------------------------------------


def test_removing_result_layer_empties_table(searched):
    assert searched.results_table.rowCount() == 3
    searched.results_table.set_relevance(searched.matches[0].tile_id, Relevance.NOT_RELEVANT)

    QgsProject.instance().removeMapLayer(searched.result_layer_id)

    assert searched.results_table.rowCount() == 0
    assert searched.results_table.tiles_marked(Relevance.NOT_RELEVANT) == []
    assert searched.matches == []
    assert searched.histogram.bin_counts() == [0] * len(searched.histogram.bin_counts())


def test_removing_result_layer_reruns_search_without_marks(searched):
    tile_ids = [match.tile_id for match in searched.matches]
    searched.results_table.set_relevance(tile_ids[0], Relevance.NOT_RELEVANT)
    searched.start_search()

    QgsProject.instance().removeMapLayer(searched.result_layer_id)
    wait_for_tasks(searched)

    # The search that ran uses no mark, as the label and table show none.
    assert [match.tile_id for match in searched.matches] == tile_ids


def test_other_index_sets_results_and_marks_aside(searched, qgis_iface, qgis_canvas, ships_layer, tmp_path):
    marked = searched.matches[0].tile_id
    searched.results_table.set_relevance(marked, Relevance.RELEVANT)
    first_layer_id = searched.result_layer_id
    other = tmp_path / "other"
    searched.gsd_spin.setValue(searched.gsd_spin.value() * 1.5)
    build(searched, other)
    assert searched.index is not None and Path(searched.index.folder) == other

    assert searched.results_table.tiles_marked(Relevance.RELEVANT) == []
    assert searched.results_table.rowCount() == 0
    assert searched.result_layer() is None
    assert searched.project.mapLayer(first_layer_id) is not None
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("came from another index" in text for text in infos), infos

    searched.start_search()
    wait_for_tasks(searched)

    assert searched.result_layer_id not in ("", first_layer_id)
    assert searched.project.mapLayer(first_layer_id) is not None
    assert searched.result_layer().name() != searched.project.mapLayer(first_layer_id).name()


def test_marks_come_back_with_their_index(searched, qgis_iface, tmp_path):
    first = tmp_path / "index"
    relevant = searched.matches[0].tile_id
    not_relevant = searched.matches[1].tile_id
    searched.results_table.set_relevance(relevant, Relevance.RELEVANT)
    searched.results_table.set_relevance(not_relevant, Relevance.NOT_RELEVANT)
    other = tmp_path / "other"
    searched.gsd_spin.setValue(searched.gsd_spin.value() * 1.5)
    build(searched, other)
    assert searched.results_table.marks() == {}
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("set aside until that index is open again" in text for text in infos), infos

    searched.index_folder.setFilePath(str(first))
    wait_until(lambda: searched.index is not None and Path(searched.index.folder) == first)
    wait_for_tasks(searched)

    assert searched.results_table.tiles_marked(Relevance.RELEVANT) == [relevant]
    assert searched.results_table.tiles_marked(Relevance.NOT_RELEVANT) == [not_relevant]
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("2 relevance mark(s) made on this index before another index was opened are back" in text
               for text in infos), infos


def test_cleared_query_drops_marks_set_aside(searched, tmp_path):
    first = tmp_path / "index"
    searched.results_table.set_relevance(searched.matches[0].tile_id, Relevance.RELEVANT)
    other = tmp_path / "other"
    searched.gsd_spin.setValue(searched.gsd_spin.value() * 1.5)
    build(searched, other)
    searched.clear_query()

    searched.index_folder.setFilePath(str(first))
    wait_until(lambda: searched.index is not None and Path(searched.index.folder) == first)
    wait_for_tasks(searched)

    assert searched.results_table.marks() == {}


def test_marks_kept_for_same_index(searched):
    marked = searched.matches[1].tile_id
    searched.results_table.set_relevance(marked, Relevance.RELEVANT)

    searched.start_search()
    wait_for_tasks(searched)

    assert searched.results_table.tiles_marked(Relevance.RELEVANT) == [marked]


def test_marks_after_clear_start_new_query(searched):
    first_layer_id = searched.result_layer_id
    first_name = searched.result_layer().name()
    searched.clear_query()
    searched.results_table.set_relevance(searched.matches[0].tile_id, Relevance.RELEVANT)

    searched.start_search()
    wait_for_tasks(searched)

    assert QgsProject.instance().mapLayer(first_layer_id) is not None
    assert searched.result_layer_id != first_layer_id
    assert searched.result_layer().name() != first_name
    assert searched.query_label.text().startswith(f"Query {searched.query_number}:")


def test_stale_thumbnails_are_dropped(searched):
    from types import SimpleNamespace

    from qgis.PyQt.QtGui import QImage

    from lookalike.gis.tasks import TaskOutcome

    listed = list(searched.matches)
    searched.results_table.set_matches(listed)
    tile_id = listed[0].tile_id
    image = QImage(4, 4, QImage.Format.Format_RGB888)
    image.fill(0)
    loaded = SimpleNamespace(outcome=TaskOutcome.SUCCEEDED, result={tile_id: image})

    # Thumbnails read for an earlier list of matches.
    searched._on_thumbnails_loaded(loaded, list(listed))
    assert not searched.results_table.has_thumbnail(tile_id)

    searched._on_thumbnails_loaded(loaded, searched.matches)
    assert searched.results_table.has_thumbnail(tile_id)


# -- query parts -------------------------------------------------------------------------------


def test_rejected_part_leaves_query(searched, qgis_iface, ships_layer):
    extent = ships_layer.extent()
    off_raster = QgsGeometry.fromWkt(f"POINT({extent.xMaximum() + 5000} {extent.yMaximum() + 5000})")
    parts_before = len(searched.query_parts)

    searched.add_query_geometry(off_raster, False)
    wait_for_tasks(searched)

    assert any("outside every indexed raster" in text for text in messages(qgis_iface, Qgis.MessageLevel.Critical))
    assert len(searched.query_parts) == parts_before
    qgis_iface.messageBar().clear_messages()
    searched.start_search()
    wait_for_tasks(searched)
    assert not messages(qgis_iface, Qgis.MessageLevel.Critical)


def test_rejected_first_part_leaves_query_number(dock, ships_layer, qgis_canvas, tmp_path):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    extent = ships_layer.extent()
    dock.add_query_geometry(QgsGeometry.fromWkt(f"POINT({extent.xMaximum() + 5000} {extent.yMaximum()})"), False)
    wait_for_tasks(dock)

    search_box(dock, qgis_canvas, ship_query_bounds(ships_layer))

    assert dock.result_layer().name() == "Lookalike query 1"


def test_rejected_part_keeps_emptied_query(searched, qgis_canvas, ships_layer):
    marked = searched.matches[0].tile_id
    searched.results_table.set_relevance(marked, Relevance.NOT_RELEVANT)
    searched.remove_last_query_part()
    wait_for_tasks(searched)
    extent = ships_layer.extent()

    searched.add_query_geometry(QgsGeometry.fromWkt(f"POINT({extent.xMaximum() + 5000} {extent.yMaximum()})"), False)
    wait_for_tasks(searched)

    assert searched.query_label.text().startswith("Query 1: no drawn part left")
    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))
    assert searched.result_layer().name() == "Lookalike query 1"
    assert searched.results_table.relevance(marked) is Relevance.NOT_RELEVANT


def test_negative_only_query_keeps_its_part(searched, qgis_iface, qgis_canvas, ships_layer):
    searched.clear_query()
    searched.negative_button.setChecked(True)

    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))

    assert any("no positive example" in text for text in messages(qgis_iface, Qgis.MessageLevel.Critical))
    assert [negative for _geometry, negative, _crs in searched.query_parts] == [True]


def test_failed_part_removed_search_reruns(searched, qgis_iface, ships_layer):
    extent = ships_layer.extent()
    # A second part on the raster, then the first one made unusable: it now lies off the imagery.
    searched.add_query_geometry(QgsGeometry.fromWkt(extent.center().asWkt()), False)
    wait_for_tasks(searched)
    first, negative, crs_wkt = searched.query_parts[0]
    moved = QgsGeometry(first)
    moved.translate(extent.width() * 3, 0)
    searched.query_parts[0] = (moved, negative, crs_wkt)
    qgis_iface.messageBar().clear_messages()

    searched.start_search()
    wait_for_tasks(searched)

    assert len(searched.query_parts) == 1
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("Query part 1 was removed" in text for text in infos), infos
    # The search ran again with the part that is left.
    assert searched.matches
    assert searched.search_task is None


def build_from_copy(dock, ships_clip, tmp_path):
    """Index a copy of the ships clip, then remove its layer; return the copy and a ship's query box."""
    import shutil

    copy = tmp_path / "ships_copy.tif"
    shutil.copy(ships_clip.source(), copy)
    layer = QgsRasterLayer(str(copy), "ships copy")
    QgsProject.instance().addMapLayer(layer)
    dock.raster_combo.setLayer(layer)
    build(dock, tmp_path / "index")
    bounds = ship_query_bounds(layer)
    QgsProject.instance().removeMapLayer(layer.id())
    return copy, bounds


def test_moved_raster_keeps_query_part(dock, ships_clip, qgis_canvas, qgis_iface, tmp_path):
    # The analyst builds from a copy, then moves the file: the drawn part is not at fault.
    copy, bounds = build_from_copy(dock, ships_clip, tmp_path)
    copy.rename(tmp_path / "ships_moved.tif")
    qgis_iface.messageBar().clear_messages()

    search_box(dock, qgis_canvas, bounds)

    errors = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("ships_copy.tif cannot be opened; move it back" in text for text in errors), errors
    assert len(dock.query_parts) == 1
    assert not any("was removed" in text for text in messages(qgis_iface, Qgis.MessageLevel.Info))


def test_damaged_raster_keeps_query_part(dock, ships_clip, qgis_canvas, qgis_iface, tmp_path):
    # An interrupted copy or sync leaves the indexed raster truncated: the drawn part is not at fault.
    copy, bounds = build_from_copy(dock, ships_clip, tmp_path)
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 8])
    qgis_iface.messageBar().clear_messages()

    search_box(dock, qgis_canvas, bounds)

    assert any("ships_copy.tif" in text for text in messages(qgis_iface, Qgis.MessageLevel.Critical))
    assert len(dock.query_parts) == 1


def test_missing_encoder_file_is_a_message(dock, ships_layer, qgis_canvas, qgis_iface, tmp_path, repo_root):
    import shutil

    encoder_copy = tmp_path / "my_encoder.onnx"
    shutil.copy(repo_root / "tests" / "data" / "tiny_encoder.onnx", encoder_copy)
    dock.encoder_file.setFilePath(str(encoder_copy))
    wait_until(lambda: dock.encoder_spec is not None)
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    encoder_copy.rename(tmp_path / "moved.onnx")
    dock.encoder_file.setFilePath(str(tmp_path / "elsewhere.onnx"))
    dock._encoder_cache = None

    search_box(dock, qgis_canvas, ship_query_bounds(ships_layer))

    errors = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any("no longer exists" in text for text in errors), errors


def test_selected_lines_not_added(searched, qgis_iface, ships_layer):
    extent = ships_layer.extent()
    lines = QgsVectorLayer(f"LineString?crs={ships_layer.crs().authid()}", "lines", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt(
        f"LINESTRING({extent.xMinimum()} {extent.yMinimum()}, {extent.xMaximum()} {extent.yMaximum()})"
    ))
    lines.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(lines)
    lines.selectAll()
    searched.query_layer_combo.setLayer(lines)
    parts_before = len(searched.query_parts)

    searched.add_selected_features()
    wait_for_tasks(searched)

    assert len(searched.query_parts) == parts_before
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("are lines" in text for text in warnings), warnings


def test_off_centre_box_searches(searched, qgis_iface, qgis_canvas, ships_layer):
    searched.clear_query()
    extent = ships_layer.extent()
    # The east half of the clip and as much again past its edge: the centre is off the raster.
    half = extent.width() / 2
    bounds = (extent.xMinimum() + half, extent.yMinimum(), extent.xMaximum() + 1.2 * half, extent.yMaximum())
    qgis_canvas.setExtent(qgis_canvas.extent().buffered(extent.width()))
    qgis_iface.messageBar().clear_messages()

    search_box(searched, qgis_canvas, bounds)

    assert not messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert searched.matches


def test_whole_raster_query_explains_empty(searched, qgis_iface, qgis_canvas, ships_layer):
    searched.clear_query()
    extent = ships_layer.extent().buffered(10.0)
    qgis_canvas.setExtent(extent.buffered(extent.width() * 0.2))
    qgis_iface.messageBar().clear_messages()

    search_box(searched, qgis_canvas, (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()))

    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert searched.matches == []
    assert any("Draw a smaller query" in text for text in infos), infos
    assert not any("threshold" in text for text in infos)


def test_box_around_half_the_globe_in_degrees(searched, qgis_iface, qgis_canvas):
    # Zoomed far out on a map in degrees, the analyst drags a box around the whole clip.
    searched.clear_query()
    map_crs = qgis_canvas.mapSettings().destinationCrs()
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    try:
        qgis_canvas.setExtent(QgsRectangle(-180.0, -90.0, 180.0, 90.0))
        qgis_iface.messageBar().clear_messages()

        search_box(searched, qgis_canvas, (-170.0, -60.0, 170.0, 80.0))
    finally:
        qgis_canvas.setDestinationCrs(map_crs)

    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert not any("outside every indexed raster" in text for text in warnings), warnings
    # The box covers the whole clip, so every tile overlaps the query.
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("Draw a smaller query" in text for text in infos), infos


def test_slider_end_keeps_single_match(searched, qgis_canvas, ships_layer):
    # One match: the histogram pads its range around the single score, past any cosine score.
    searched.clear_query()
    searched.k_spin.setValue(1)
    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))
    assert len(searched.matches) == 1

    searched.threshold_slider.setValue(searched.threshold_slider.maximum())

    assert searched.result_layer().featureCount() == 1
    assert "(1 shown)" in searched.threshold_label.text()


def test_export_message_counts_filtered_matches(searched, qgis_iface, tmp_path):
    qgis_iface.messageBar().clear_messages()
    searched.export_layer(str(tmp_path / "all.gpkg"), "GeoPackage")
    successes = messages(qgis_iface, Qgis.MessageLevel.Success)
    assert any(f"Exported 3 matches to {tmp_path / 'all.gpkg'}" in text for text in successes), successes

    searched.threshold_slider.setValue(searched.threshold_slider.maximum())
    shown_count = searched.result_layer().featureCount()
    assert shown_count < 3
    qgis_iface.messageBar().clear_messages()
    searched.export_layer(str(tmp_path / "best.gpkg"), "GeoPackage")

    successes = messages(qgis_iface, Qgis.MessageLevel.Success)
    assert any(f"Exported {shown_count} of the 3 matches, those at or above Min score" in text for text in successes), \
        successes


def test_chips_at_slider_end_export_best_match(searched, qgis_canvas, ships_layer, tmp_path):
    folder = tmp_path / "chips"
    searched.export_chips(str(folder))
    wait_for_tasks(searched)
    assert len(list(folder.glob("chip_*.tif"))) == 3
    # One match: the histogram pads the range around its score, past the slider's end.
    searched.clear_query()
    searched.k_spin.setValue(1)
    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))

    searched.threshold_slider.setValue(searched.threshold_slider.maximum())
    searched.export_chips(str(folder))
    wait_for_tasks(searched)

    assert sorted(path.name for path in folder.glob("chip_*.tif")) == ["chip_00001.tif"]


def test_new_query_name_avoids_project_layers(searched, qgis_canvas, ships_layer):
    # Result layers come back empty from a saved project; the next query must not reuse their names.
    leftover = QgsVectorLayer("Polygon?crs=EPSG:32610", "Lookalike query 2", "memory")
    QgsProject.instance().addMapLayer(leftover)
    searched.clear_query()

    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))

    assert searched.result_layer().name() == "Lookalike query 3"
    assert len(QgsProject.instance().mapLayersByName("Lookalike query 2")) == 1


def test_query_label_counts_marks_without_rows(searched, qgis_canvas):
    worst = searched.matches[-1].tile_id
    searched.results_table.set_relevance(worst, Relevance.NOT_RELEVANT)
    assert "1 not relevant" in searched.query_label.text()
    searched.k_spin.setValue(1)

    searched.start_search()
    wait_for_tasks(searched)

    assert worst not in [match.tile_id for match in searched.matches]
    assert "Marked tiles: 0 relevant, 1 not relevant." in searched.query_label.text()
    searched.clear_query()
    assert "Marked" not in searched.query_label.text()


def test_negative_over_positive_warned(searched, qgis_iface, qgis_canvas, ships_layer):
    searched.clear_query()
    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))
    qgis_iface.messageBar().clear_messages()
    searched.negative_button.setChecked(True)

    search_box(searched, qgis_canvas, ship_query_bounds(ships_layer))

    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("not over the examples themselves" in text for text in warnings), warnings


def test_saved_project_brings_results_back(searched, tmp_path):
    layer = searched.result_layer()
    saved = sorted((feature["rank"], feature["tile_id"], feature["score"]) for feature in layer.getFeatures())
    saved_extent = layer.extent()
    # The analyst raised the threshold so that only the best match (and any tied with it) shows.
    searched.threshold_slider.setValue(searched.threshold_slider.maximum())
    best_count = sum(1 for _rank, _tile_id, score in saved if score == max(score for *_, score in saved))
    assert best_count < len(saved)
    assert layer.featureCount() == best_count
    project_path = tmp_path / "survey.qgz"
    assert QgsProject.instance().write(str(project_path))

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(searched)

    (restored,) = QgsProject.instance().mapLayersByName("Lookalike query 1")
    assert restored.featureCount() == best_count
    restored.setSubsetString("")
    restored_matches = sorted((feature["rank"], feature["tile_id"], feature["score"])
                              for feature in restored.getFeatures())
    assert restored_matches == saved
    assert restored.extent().toString(1) == saved_extent.toString(1)


def save_and_reopen(dock, path) -> None:
    assert QgsProject.instance().write(str(path))
    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(path))
    wait_for_tasks(dock)


def test_saved_project_continues_query(searched, qgis_canvas, ships_layer, tmp_path):
    relevant, not_relevant = searched.matches[0].tile_id, searched.matches[1].tile_id
    searched.results_table.set_relevance(relevant, Relevance.RELEVANT)
    searched.results_table.set_relevance(not_relevant, Relevance.NOT_RELEVANT)
    searched.threshold_slider.setValue(searched.threshold_slider.maximum() // 2)
    shown = searched.threshold_label.text()
    tile_ids = [match.tile_id for match in searched.matches]
    part_wkt = searched.query_parts[0][0].asWkt()

    save_and_reopen(searched, tmp_path / "survey.qgz")

    (restored,) = QgsProject.instance().mapLayersByName("Lookalike query 1")
    assert searched.result_layer() is restored
    assert [match.tile_id for match in searched.matches] == tile_ids
    assert searched.results_table.rowCount() == len(tile_ids)
    assert searched.results_table.relevance(relevant) is Relevance.RELEVANT
    assert searched.results_table.relevance(not_relevant) is Relevance.NOT_RELEVANT
    assert searched.threshold_label.text() == shown
    assert [(geometry.asWkt(), negative) for geometry, negative, _crs in searched.query_parts] == [(part_wkt, False)]
    assert len(searched.overlay) == 1
    assert searched.query_label.text().startswith("Query 1: 1 positive")

    # The slider drives the restored layer, and a new search replaces it as the same query.
    searched.threshold_slider.setValue(0)
    assert restored.featureCount() == len(tile_ids)
    searched.start_search()
    wait_for_tasks(searched)
    assert [layer.name() for layer in QgsProject.instance().mapLayersByName("Lookalike query 1")] == [
        "Lookalike query 1"
    ]
    assert searched.result_layer().name() == "Lookalike query 1"
    assert not_relevant not in [match.tile_id for match in searched.matches]


def test_saved_project_keeps_emptied_query(searched, qgis_canvas, ships_layer, tmp_path):
    searched.results_table.set_relevance(searched.matches[0].tile_id, Relevance.RELEVANT)
    searched.remove_last_query_part()
    wait_for_tasks(searched)
    # The project's layers are new objects once it is read again.
    box = ship_query_bounds(ships_layer)

    save_and_reopen(searched, tmp_path / "survey.qgz")

    assert searched.query_label.text().startswith("Query 1: no drawn part left")
    # A drawing continues query 1 and its marks, as it would have before the project was saved.
    search_box(searched, qgis_canvas, box)
    assert searched.result_layer().name() == "Lookalike query 1"
    assert QgsProject.instance().mapLayersByName("Lookalike query 2") == []


def delete_features_by_hand(layer, tile_ids) -> None:
    """Delete the features of ``tile_ids`` in an edit session, as the attribute table's Delete does."""
    layer.startEditing()
    layer.deleteFeatures([feature.id() for feature in layer.getFeatures() if feature["tile_id"] in tile_ids])
    assert layer.commitChanges()


def shown_tile_ids(dock) -> list:
    table = dock.results_table
    return sorted(table.item(row, table.COLUMN_THUMBNAIL).data(Qt.ItemDataRole.UserRole)
                  for row in range(table.rowCount()) if not table.isRowHidden(row))


def test_table_follows_deleted_features(searched):
    best = searched.matches[0].tile_id
    remaining = sorted(match.tile_id for match in searched.matches[1:])

    delete_features_by_hand(searched.result_layer(), {best})

    assert shown_tile_ids(searched) == remaining
    assert searched.threshold_label.text().endswith(f"({len(remaining)} shown)")
    assert sorted(match.tile_id for match in searched.matches) == remaining


def test_deleted_features_stay_deleted_after_reopen(searched, tmp_path):
    best = searched.matches[0].tile_id
    remaining = sorted(match.tile_id for match in searched.matches[1:])
    delete_features_by_hand(searched.result_layer(), {best})

    save_and_reopen(searched, tmp_path / "survey.qgz")

    (restored,) = QgsProject.instance().mapLayersByName("Lookalike query 1")
    assert sorted(feature["tile_id"] for feature in restored.getFeatures()) == remaining
    assert shown_tile_ids(searched) == remaining


def test_deletion_after_reopen_is_kept(searched, tmp_path):
    remaining = sorted(match.tile_id for match in searched.matches[:-1])
    save_and_reopen(searched, tmp_path / "survey.qgz")
    (restored,) = QgsProject.instance().mapLayersByName("Lookalike query 1")
    delete_features_by_hand(restored, {searched.matches[-1].tile_id})

    save_and_reopen(searched, tmp_path / "survey.qgz")

    (reopened,) = QgsProject.instance().mapLayersByName("Lookalike query 1")
    assert sorted(feature["tile_id"] for feature in reopened.getFeatures()) == remaining


def test_layer_of_other_index_named_after_reopen(searched, tmp_path, qgis_iface):
    layer = searched.result_layer()
    record = json.loads(layer.customProperty(RESULTS_PROPERTY))
    record.update(index_id="another build", index_folder=str(tmp_path / "harbour_index"))
    layer.setCustomProperty(RESULTS_PROPERTY, json.dumps(record))
    qgis_iface.messageBar().clear_messages()

    save_and_reopen(searched, tmp_path / "survey.qgz")

    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any(f"'Lookalike query 1' came from the index in {tmp_path / 'harbour_index'}" in text
               for text in infos), infos


def test_search_reopens_index_changed_elsewhere(searched, tmp_path, qgis_iface, ships_layer):
    index = searched.index
    corner = tmp_path / "corner.tif"
    gdal.Translate(str(corner), ships_layer.source(), srcWin=[0, 0, 200, 200])
    # Another program adds a raster to the open index, as qgis_process would.
    build_index(BuildParameters(source_paths=(str(corner),), index_folder=str(index.folder),
                                encoder_path=searched.encoder_path(), overlap_fraction=0.5, add_to_existing=True))
    qgis_iface.messageBar().clear_messages()

    searched.start_search()
    wait_for_tasks(searched)

    assert searched.index.count > index.count
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("was changed, moved or deleted by another build or program" in text for text in infos), infos
    assert searched.matches


def test_search_after_index_deleted_says_so(searched, qgis_iface):
    shutil.rmtree(searched.index.folder)
    qgis_iface.messageBar().clear_messages()

    searched.start_search()
    wait_for_tasks(searched)

    assert searched.index is None
    assert searched.search_task is None
    assert searched.status_label.text() == "No index open."


def test_project_moved_away_from_index_names_the_fallback(searched, tmp_path, qgis_iface):
    project_folder = tmp_path / "survey"
    project_folder.mkdir()
    assert QgsProject.instance().write(str(project_folder / "survey.qgz"))
    moved = tmp_path / "archive" / "survey"
    moved.parent.mkdir()
    project_folder.rename(moved)
    QgsProject.instance().clear()
    qgis_iface.messageBar().clear_messages()

    assert QgsProject.instance().read(str(moved / "survey.qgz"))
    wait_for_tasks(searched)

    assert searched.index is not None
    assert Path(searched.index.folder) == tmp_path / "index"
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any(f"Lookalike uses {tmp_path / 'index'}, where it was when the project was saved" in text
               for text in infos), infos


def test_saved_project_exports_restored_layer(searched, tmp_path):
    save_and_reopen(searched, tmp_path / "survey.qgz")

    written = searched.export_layer(str(tmp_path / "matches.gpkg"))

    assert written is not None
    exported = QgsVectorLayer(str(written), "exported", "ogr")
    assert exported.featureCount() == len(searched.matches) > 0


def reopen_after_rebuild(dock, project_path: Path) -> None:
    """Save the project, give the index folder another build's id (as a rebuild does), and reopen the project."""
    assert QgsProject.instance().write(str(project_path))
    manifest_path = Path(dock.index.folder) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["index_id"] = "a later build"
    manifest_path.write_text(json.dumps(manifest))
    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(dock)


def test_saved_marks_of_earlier_build_not_restored(searched, tmp_path):
    marked = searched.matches[0].tile_id
    searched.results_table.set_relevance(marked, Relevance.RELEVANT)
    reopen_after_rebuild(searched, tmp_path / "survey.qgz")

    assert searched.results_table.tiles_marked(Relevance.RELEVANT) == []
    assert searched.result_layer() is None
    assert len(searched.query_parts) == 1


def test_rebuild_of_open_index_sets_results_aside(searched, qgis_iface, monkeypatch):
    monkeypatch.setattr(QMessageBox, "question", lambda *_args: QMessageBox.StandardButton.Yes)
    searched.results_table.set_relevance(searched.matches[0].tile_id, Relevance.RELEVANT)
    old_layer_id = searched.result_layer_id

    build(searched, Path(searched.index.folder))

    assert searched.result_layer() is None
    assert searched.results_table.rowCount() == 0
    assert searched.results_table.marks() == {}
    assert QgsProject.instance().mapLayer(old_layer_id) is not None
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("came from an earlier build of this index" in text for text in infos), infos


def test_fewer_matches_than_k_explained(searched, qgis_iface):
    searched.k_spin.setValue(searched.k_spin.maximum())
    searched.start_search()
    wait_for_tasks(searched)

    assert 0 < len(searched.matches) < searched.k_spin.value()
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any(f"found {len(searched.matches)} of the {searched.k_spin.value()} matches" in text
               for text in warnings), warnings


def test_export_into_missing_folder_named(searched, qgis_iface, tmp_path):
    missing = tmp_path / "no such folder"

    assert searched.export_layer(str(missing / "matches.gpkg")) is None

    critical = messages(qgis_iface, Qgis.MessageLevel.Critical)
    assert any(f"The folder {missing} does not exist" in text for text in critical), critical


def test_bad_saved_matches_leave_others_filled(searched, tmp_path):
    # A property edited by hand (or an index folder restored from an older copy with fewer tiles).
    good = searched.result_layer()
    saved_count = good.featureCount()
    edited = good.clone()
    edited.setName("edited")
    stored = json.loads(good.customProperty(RESULTS_PROPERTY))
    stored["matches"] = [[1, 10**9, 0.5]]
    edited.setCustomProperty(RESULTS_PROPERTY, json.dumps(stored))
    QgsProject.instance().addMapLayer(edited)
    project_path = tmp_path / "survey.qgz"
    assert QgsProject.instance().write(str(project_path))

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(searched)

    assert QgsProject.instance().mapLayersByName("edited")[0].featureCount() == 0
    assert QgsProject.instance().mapLayersByName("Lookalike query 1")[0].featureCount() == saved_count
    assert searched.status_label.text().startswith("Index open")


def test_results_of_earlier_build_named(searched, qgis_iface, tmp_path):
    # The index folder was built again since the project was saved: the saved tile ids may name other tiles.
    layer = searched.result_layer()
    stored = json.loads(layer.customProperty(RESULTS_PROPERTY))
    assert stored["index_folder"] == searched.index.identity[0]
    stored["index_id"] = "an earlier build"
    layer.setCustomProperty(RESULTS_PROPERTY, json.dumps(stored))
    project_path = tmp_path / "survey.qgz"
    assert QgsProject.instance().write(str(project_path))
    qgis_iface.messageBar().clear_messages()

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(searched)

    assert QgsProject.instance().mapLayersByName("Lookalike query 1")[0].featureCount() == 0
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    earlier_build = [text for text in warnings if "'Lookalike query 1' came from an earlier build" in text]
    assert earlier_build, warnings
    assert "run their queries again" in earlier_build[0]


def test_search_button_cancels_search(searched, monkeypatch):
    from lookalike.ui import jobs

    def slow_search(request, task):
        wait_until(task.isCanceled, timeout_s=30.0)
        task.check_cancelled()

    monkeypatch.setattr(jobs, "search_work", slow_search)
    matches_before = list(searched.matches)
    searched.start_search()
    assert searched.search_button.text() == "Cancel search"

    QTest.mouseClick(searched.search_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(searched)

    assert searched.search_task is None
    assert searched.search_button.text() == "Search"
    assert searched.matches == matches_before


def test_search_finishing_after_index_switch_not_shown(searched, qgis_iface, ships_layer, tmp_path, monkeypatch):
    from lookalike.ui import jobs

    release = []
    real_search_work = jobs.search_work

    def held_search(request, task):
        wait_until(lambda: release, timeout_s=30.0)
        return real_search_work(request, task)

    first_layer_id = searched.result_layer_id
    other = tmp_path / "other"
    searched.gsd_spin.setValue(searched.gsd_spin.value() * 1.5)
    build(searched, other)
    searched.index_folder.setFilePath(str(tmp_path / "index"))
    wait_for_tasks(searched)
    monkeypatch.setattr(jobs, "search_work", held_search)
    searched.start_search()
    searched.index_folder.setFilePath(str(other))
    wait_until(lambda: searched.index is not None and Path(searched.index.folder) == other)
    release.append(True)
    wait_for_tasks(searched)

    assert searched.matches == []
    assert searched.results_table.rowCount() == 0
    assert searched.result_layer() is None
    assert QgsProject.instance().mapLayer(first_layer_id) is not None
    infos = messages(qgis_iface, Qgis.MessageLevel.Info)
    assert any("finished after its index was replaced (another index opened" in text for text in infos)


def test_selected_features_rejected_without_index(dock, ships_layer, qgis_iface):
    points = QgsVectorLayer("Point?crs=EPSG:32610", "examples", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POINT (558585 4176120)"))
    points.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(points)
    points.selectAll()
    dock.query_layer_combo.setLayer(points)

    dock.add_selected_features()

    assert dock.query_parts == []
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("No index is open, so the selection was not kept" in text for text in warnings), warnings


def test_query_of_rebuilt_index_gets_new_layer_name(searched, tmp_path):
    reopen_after_rebuild(searched, tmp_path / "survey.qgz")

    searched.start_search()
    wait_for_tasks(searched)

    names = sorted(layer.name() for layer in QgsProject.instance().mapLayers().values()
                   if layer.name().startswith("Lookalike query"))
    assert names == ["Lookalike query 1", "Lookalike query 2"]
    assert searched.result_layer().name() == "Lookalike query 2"


def edit_saved_session(project_path: Path, edit) -> None:
    """Change the query saved in a .qgs project file, as a hand edit would."""
    import xml.etree.ElementTree as ElementTree

    tree = ElementTree.parse(project_path)
    entry = tree.getroot().find("./properties/lookalike/query_session")
    record = json.loads(entry.text)
    edit(record)
    entry.text = json.dumps(record)
    tree.write(project_path)


def test_hand_edited_marks_outside_index_left_out(searched, tmp_path):
    kept = searched.matches[0].tile_id
    searched.results_table.set_relevance(kept, Relevance.RELEVANT)
    project_path = tmp_path / "survey.qgs"
    assert QgsProject.instance().write(str(project_path))
    edit_saved_session(project_path, lambda record: record["marks"].extend(
        [[10**9, "relevant"], [-5, "not relevant"]]))

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(searched)

    assert searched.results_table.marks() == {kept: Relevance.RELEVANT}
    searched.start_search()
    wait_for_tasks(searched)
    assert searched.matches


def test_hand_edited_part_flag_rejected_with_message(searched, qgis_iface, tmp_path):
    project_path = tmp_path / "survey.qgs"
    assert QgsProject.instance().write(str(project_path))
    edit_saved_session(project_path, lambda record: record["parts"][0].__setitem__(1, "false"))

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(searched)

    assert searched.query_parts == []
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert any("The Lookalike query saved in this project cannot be restored ('false' is not true or false)"
               in text for text in warnings), warnings


def test_query_outline_follows_map_crs(searched, qgis_canvas):
    (band,) = searched.overlay._bands
    centre = band.asGeometry().centroid().asPoint()
    web_mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    drawn_crs = qgis_canvas.mapSettings().destinationCrs()

    qgis_canvas.setDestinationCrs(web_mercator)

    try:
        (band,) = searched.overlay._bands
        moved = band.asGeometry().centroid().asPoint()
    finally:
        qgis_canvas.setDestinationCrs(drawn_crs)
    expected = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32610"), web_mercator,
                                      QgsProject.instance()).transform(centre)
    assert moved.distance(expected) < 1.0


def test_foreign_chip_rejected_before_question(searched, tmp_path, monkeypatch, qgis_iface):
    folder = tmp_path / "chips"
    folder.mkdir()
    own_chip = folder / "chip_00001.tif"
    own_chip.write_bytes(b"the analyst's own file")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *_args, **_kwargs: str(folder))
    questions = answer_no(monkeypatch)

    searched.export_chips_with_dialog()

    # Asked first, the analyst would confirm an export that then stops.
    assert questions == []
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("chip_00001.tif, which no labels.csv of an earlier Lookalike export there lists" in text
               for text in warnings)
    assert own_chip.read_bytes() == b"the analyst's own file"
