"""The dock end to end: build an index, drag a query on the canvas, review, mark, re-run and export.

Runs the real dock widget and map tools offscreen on the RapidEye clip with four ships, indexed
with the tiny test encoder so a build takes seconds.
"""

import csv
from pathlib import Path

import pytest
from dock_testing import (
    SHIPS_RASTER,
    build,
    drag_rectangle,
    map_to_pixel,
    messages,
    ship_query_bounds,
    show_layer,
    wait_for_tasks,
)
from qgis.core import (
    Qgis,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QFileDialog, QPushButton

from lookalike.gis import matches as match_fields
from lookalike.ui.dock import EXTENT_SELECTED, LookalikeDockWidget
from lookalike.ui.results import Relevance


def test_dock_build_shows_progress_and_opens_index(dock, ships_layer, tmp_path, qgis_iface):
    dock.raster_combo.setLayer(ships_layer)
    progress_lines = []
    dock.status_label.setText("")
    folder = tmp_path / "ships_index"
    dock.index_folder.setFilePath(str(folder))
    task = dock.start_build()
    task.tileProgress.connect(lambda _progress: progress_lines.append(dock.status_label.text()))
    wait_for_tasks(dock)

    assert dock.index is not None
    assert dock.index.count > 50
    assert (folder / "manifest.json").is_file()
    assert any(" of " in line and "tiles" in line for line in progress_lines)
    assert dock.progress_bar.value() == 100
    assert any("Index built" in text for text in messages(qgis_iface, Qgis.MessageLevel.Success))


def test_build_message_names_skip_reasons(dock, ships_layer, tmp_path, qgis_iface):
    extent = ships_layer.extent()
    west_half = QgsRectangle(extent.xMinimum(), extent.yMinimum(), extent.center().x(), extent.yMaximum())
    mask = QgsVectorLayer(f"Polygon?crs={ships_layer.crs().authid()}", "west half", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(west_half))
    mask.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(mask)
    dock.raster_combo.setLayer(ships_layer)
    dock.mask_combo.setLayer(mask)

    build(dock, tmp_path / "masked")

    built = [text for text in messages(qgis_iface, Qgis.MessageLevel.Success) if "Index built" in text]
    assert len(built) == 1
    assert "skipped (" in built[0], built[0]
    assert "masked" in built[0], built[0]


def test_dock_rectangle_query_mark_rerun_export(dock, ships_layer, tmp_path, qgis_canvas, qgis_iface):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    assert dock.index is not None

    dock.k_spin.setValue(8)
    dock.activate_tool("rectangle")
    assert qgis_canvas.mapTool() is dock.map_tools["rectangle"]
    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))
    assert len(dock.overlay) == 1
    wait_for_tasks(dock)

    assert not messages(qgis_iface, Qgis.MessageLevel.Critical)
    layer = dock.result_layer()
    assert isinstance(layer, QgsVectorLayer)
    assert layer.name() == "Lookalike query 1"
    assert layer.featureCount() == 8
    features = sorted(layer.getFeatures(), key=lambda feature: feature[match_fields.FIELD_RANK])
    ranks = [feature[match_fields.FIELD_RANK] for feature in features]
    scores = [feature[match_fields.FIELD_SCORE] for feature in features]
    assert ranks == list(range(1, 9))
    assert scores == sorted(scores, reverse=True)
    assert features[0][match_fields.FIELD_ENCODER] == "tiny_test_encoder"
    assert features[0][match_fields.FIELD_SOURCE].endswith(SHIPS_RASTER.name)
    assert dock.results_table.rowCount() == 8
    assert all(dock.results_table.has_thumbnail(tile_id) for tile_id in dock.results_table.tile_ids())

    # The threshold slider filters layer and table without searching again.
    dock.threshold_slider.setValue(dock.threshold_slider.maximum())
    # At its end the slider keeps the best match, and any that ties with it.
    best_count = sum(1 for score in scores if score == scores[0])
    assert best_count < 8
    assert layer.featureCount() == best_count
    shown_rows = [row for row in range(8) if not dock.results_table.isRowHidden(row)]
    assert len(shown_rows) == best_count
    dock.threshold_slider.setValue(0)
    assert layer.featureCount() == 8

    # Mark the best match relevant and the last one not relevant, then search again.
    best, worst = dock.matches[0].tile_id, dock.matches[-1].tile_id
    dock.results_table.selectRow(0)
    QTest.mouseClick(dock.findChild(type(dock.build_button), "lookalikeMarkRelevant"), Qt.MouseButton.LeftButton)
    dock.results_table.set_relevance(worst, Relevance.NOT_RELEVANT)
    assert dock.results_table.tiles_marked(Relevance.RELEVANT) == [best]
    QTest.mouseClick(dock.search_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)
    rerun_layer = dock.result_layer()
    assert rerun_layer.name() == "Lookalike query 1"
    assert len(QgsProject.instance().mapLayersByName("Lookalike query 1")) == 1
    assert dock.results_table.relevance(best) is Relevance.RELEVANT
    assert worst not in [match.tile_id for match in dock.matches[:1]]

    # Clicking a row centres the map on the match.
    dock.results_table.cellClicked.emit(0, 1)
    centre = qgis_canvas.center()
    assert rerun_layer.extent().contains(centre)

    exported = dock.export_layer(str(tmp_path / "matches.gpkg"), "GeoPackage")
    assert exported is not None
    written = QgsVectorLayer(str(exported), "written", "ogr")
    assert written.isValid()
    assert written.featureCount() == rerun_layer.featureCount()
    assert dock.export_layer(str(tmp_path / "matches.gpkg"), "GeoPackage") is None
    assert any("already exists" in text for text in messages(qgis_iface, Qgis.MessageLevel.Critical))


def test_dock_project_reopen_reloads_index(dock, ships_layer, tmp_path):
    dock.raster_combo.setLayer(ships_layer)
    folder = tmp_path / "index"
    build(dock, folder)
    project_path = tmp_path / "ships.qgz"
    assert QgsProject.instance().write(str(project_path))

    QgsProject.instance().clear()
    assert dock.index is None
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(dock)

    assert dock.index is not None
    assert Path(dock.index.folder) == folder
    assert dock.index_folder.filePath() == str(folder)
    assert dock.raster_combo.currentLayer().name() == "ships"


def test_dock_project_reopen_restores_bands(dock, ships_layer, tmp_path):
    dock.raster_combo.setLayer(ships_layer)
    for combo, band in zip(dock.band_combos, (3, 2, 1)):
        combo.setBand(band)
    build(dock, tmp_path / "index")
    project_path = tmp_path / "ships.qgz"
    assert QgsProject.instance().write(str(project_path))

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(dock)

    assert [combo.currentBand() for combo in dock.band_combos] == [3, 2, 1]
    assert dock.index.sources[0]["band_indexes"] == [3, 2, 1]


def test_dock_missing_index_offers_locate(dock, ships_layer, tmp_path, qgis_iface, monkeypatch):
    dock.raster_combo.setLayer(ships_layer)
    folder = tmp_path / "index"
    build(dock, folder)
    project_path = tmp_path / "ships.qgz"
    assert QgsProject.instance().write(str(project_path))
    moved = folder.rename(tmp_path / "moved_index")

    bar = qgis_iface.messageBar()
    bar.clearWidgets()
    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(dock)

    assert dock.index is None
    item = bar.currentItem()
    assert item is not None
    assert "cannot be opened" in item.text()
    assert "Locate" in item.text()
    button = item.findChild(QPushButton, "lookalikeMessageButton")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *_args, **_kwargs: str(moved))
    QTest.mouseClick(button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert dock.index is not None
    assert Path(dock.index.folder) == moved
    stored, _found = QgsProject.instance().readEntry("lookalike", "/index_folder")
    assert Path(QgsProject.instance().pathResolver().readPath(stored)) == moved


def test_dock_exports_marked_chips(dock, ships_layer, tmp_path, qgis_canvas, qgis_iface):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    dock.k_spin.setValue(4)
    dock.activate_tool("rectangle")
    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))
    wait_for_tasks(dock)
    first, second = dock.matches[0].tile_id, dock.matches[1].tile_id
    dock.results_table.set_relevance(first, Relevance.RELEVANT)
    dock.results_table.set_relevance(second, Relevance.NOT_RELEVANT)

    task = dock.export_chips(str(tmp_path / "chips"), "PNG")
    assert task is not None
    wait_for_tasks(dock)

    report = task.result
    assert report.written_count == 4
    assert all(path.suffix == ".png" for path in report.chip_paths)
    with report.csv_path.open(encoding="utf-8", newline="") as stream:
        labels = [row["label"] for row in csv.DictReader(stream)]
    assert labels == ["relevant", "not relevant", "", ""]
    assert any("Exported 4 chips" in text for text in messages(qgis_iface, Qgis.MessageLevel.Success))


def test_plugin_toggle_creates_and_cleans_dock(qgis_iface):
    import lookalike

    plugin = lookalike.classFactory(qgis_iface)
    plugin.initGui()
    plugin.actions[0].setChecked(True)
    assert isinstance(plugin.dock, LookalikeDockWidget)
    dock_widget = plugin.dock
    dock_widget.activate_tool("polygon")
    plugin.unload()
    assert plugin.dock is None
    assert qgis_iface.mapCanvas().mapTool() is not dock_widget.map_tools["polygon"]


@pytest.mark.parametrize(
    ("format_name", "extension"),
    [("GeoJSON", "geojson"), ("CSV", "csv"), ("ESRI Shapefile", "shp")],
)
def test_dock_export_formats(dock, ships_layer, tmp_path, qgis_canvas, format_name, extension):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    dock.k_spin.setValue(3)
    dock.activate_tool("rectangle")
    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))
    wait_for_tasks(dock)

    exported = dock.export_layer(str(tmp_path / f"matches.{extension}"), format_name)
    written = QgsVectorLayer(str(exported), "written", "ogr")
    assert written.isValid()
    assert written.featureCount() == 3
    assert "score" in written.fields().names()
    assert written.isSpatial()


def test_drawing_without_index_is_not_kept(dock, ships_layer, qgis_canvas, qgis_iface):
    show_layer(qgis_canvas, ships_layer)
    dock.activate_tool("rectangle")

    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))

    assert dock.query_parts == []
    assert len(dock.overlay) == 0
    assert dock.query_number == 0
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("No index is open, so the drawing was not kept" in text for text in warnings), warnings


def search_ship_then_water_negative(dock, ships_layer, folder, canvas) -> None:
    """Build the ships index, search with a box around a ship, then add a negative box over water."""
    dock.raster_combo.setLayer(ships_layer)
    build(dock, folder)
    dock.activate_tool("rectangle")
    drag_rectangle(canvas, ship_query_bounds(ships_layer))
    wait_for_tasks(dock)
    extent = ships_layer.extent()
    water = (extent.xMinimum() + 100, extent.yMinimum() + 100, extent.xMinimum() + 400, extent.yMinimum() + 400)
    drag_rectangle(canvas, water, Qt.KeyboardModifier.ShiftModifier)
    wait_for_tasks(dock)


def test_shift_drag_adds_negative_part(dock, ships_layer, tmp_path, qgis_canvas):
    search_ship_then_water_negative(dock, ships_layer, tmp_path / "index", qgis_canvas)

    assert [negative for _geometry, negative, _crs in dock.query_parts] == [False, True]
    assert "1 positive, 1 negative" in dock.query_label.text()
    assert dock.result_layer().featureCount() == dock.k_spin.value()

    dock.clear_query()
    assert len(dock.overlay) == 0
    assert dock.query_parts == []


def test_negative_over_the_example_among_others_warns(dock, ships_layer, tmp_path, qgis_canvas, qgis_iface):
    search_ship_then_water_negative(dock, ships_layer, tmp_path / "index", qgis_canvas)

    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer), Qt.KeyboardModifier.ShiftModifier)
    wait_for_tasks(dock)

    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    # The water negative came first, so the one over the example is the second.
    assert any("Negative example 2 of 2 (counted in the order given) looks like the positive ones" in text
               for text in warnings), warnings


def test_remove_last_part_searches_again(dock, ships_layer, tmp_path, qgis_canvas, qgis_iface):
    search_ship_then_water_negative(dock, ships_layer, tmp_path / "index", qgis_canvas)
    dock.results_table.set_relevance(dock.matches[0].tile_id, Relevance.RELEVANT)
    marked = dock.results_table.marks()

    QTest.mouseClick(dock.remove_part_button, Qt.MouseButton.LeftButton)
    assert dock.search_task is not None
    wait_for_tasks(dock)

    assert [negative for _geometry, negative, _crs in dock.query_parts] == [False]
    assert len(dock.overlay) == 1
    assert "1 positive, 0 negative" in dock.query_label.text()
    assert dock.results_table.marks() == marked
    assert len(dock.matches) == dock.k_spin.value()

    QTest.mouseClick(dock.remove_part_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)
    assert dock.query_parts == []
    assert len(dock.overlay) == 0
    assert not dock.remove_part_button.isEnabled()
    # The relevant mark is still there to clear.
    assert dock.clear_query_button.isEnabled()

    # Parts removed one by one leave the query open: the next part continues it, marks included.
    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))
    wait_for_tasks(dock)
    assert dock.result_layer().name() == "Lookalike query 1"
    assert dock.results_table.marks() == marked


def test_remove_last_positive_says_no_search_ran(dock, ships_layer, tmp_path, qgis_canvas, qgis_iface):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    dock.activate_tool("rectangle")
    extent = ships_layer.extent()
    water = (extent.xMinimum() + 100, extent.yMinimum() + 100, extent.xMinimum() + 400, extent.yMinimum() + 400)
    drag_rectangle(qgis_canvas, water, Qt.KeyboardModifier.ShiftModifier)
    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))
    wait_for_tasks(dock)
    tile_ids_before = [match.tile_id for match in dock.matches]

    QTest.mouseClick(dock.remove_part_button, Qt.MouseButton.LeftButton)

    assert dock.search_task is None
    assert [negative for _geometry, negative, _crs in dock.query_parts] == [True]
    assert [match.tile_id for match in dock.matches] == tile_ids_before
    infos = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
    assert any("No positive part or relevant mark is left, so no search ran" in text for text in infos)


def test_parts_menu_removes_a_chosen_part(dock, ships_layer, tmp_path, qgis_canvas):
    search_ship_then_water_negative(dock, ships_layer, tmp_path / "index", qgis_canvas)
    negative_wkt = dock.query_parts[1][0].asWkt()
    dock.query_parts_menu.aboutToShow.emit()
    labels = [action.text() for action in dock.query_parts_menu.actions()]

    dock.query_parts_menu.actions()[0].trigger()
    wait_for_tasks(dock)

    assert labels == ["Remove part 1: positive example 1", "Remove part 2: negative example 1"]
    assert [(geometry.asWkt(), negative) for geometry, negative, _crs in dock.query_parts] == [(negative_wkt, True)]
    assert len(dock.overlay) == 1


def start_ship_search(dock, ships_layer, folder, canvas) -> None:
    """Build the ships index and draw a box around a ship, leaving its search running."""
    dock.raster_combo.setLayer(ships_layer)
    build(dock, folder)
    dock.activate_tool("rectangle")
    drag_rectangle(canvas, ship_query_bounds(ships_layer))
    assert dock.search_task is not None


def test_remove_last_part_cancels_the_running_search(dock, ships_layer, tmp_path, qgis_canvas):
    start_ship_search(dock, ships_layer, tmp_path / "index", qgis_canvas)

    QTest.mouseClick(dock.remove_part_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    # The search of the removed part shows nothing.
    assert dock.query_parts == []
    assert dock.result_layer() is None or dock.result_layer().featureCount() == 0
    assert "no drawn part left" in dock.query_label.text()


def test_clear_mark_without_selection_clears_every_mark(dock, ships_layer, tmp_path, qgis_canvas, qgis_iface):
    search_ship_then_water_negative(dock, ships_layer, tmp_path / "index", qgis_canvas)
    # A mark of a tile the table no longer lists has no row to select.
    dock.results_table.restore_marks({dock.matches[0].tile_id: Relevance.RELEVANT, 10**6: Relevance.NOT_RELEVANT})
    dock.results_table.clearSelection()

    QTest.mouseClick(dock.findChild(type(dock.build_button), "lookalikeClearMark"), Qt.MouseButton.LeftButton)

    assert dock.results_table.marks() == {}
    infos = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
    assert any("Cleared the 2 relevance mark(s) of this query." in text for text in infos)


def test_clear_query_cancels_the_running_search(dock, ships_layer, tmp_path, qgis_canvas):
    start_ship_search(dock, ships_layer, tmp_path / "index", qgis_canvas)

    dock.clear_query()
    wait_for_tasks(dock)

    assert dock.query_parts == []
    assert dock.result_layer() is None or dock.result_layer().featureCount() == 0


def click_map(canvas, x: float, y: float, button=Qt.MouseButton.LeftButton) -> None:
    QTest.mouseClick(canvas.viewport(), button, Qt.KeyboardModifier.NoModifier, map_to_pixel(canvas, x, y))


def test_polygon_tool_draws_query(dock, ships_layer, tmp_path, qgis_canvas):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    xmin, ymin, xmax, ymax = ship_query_bounds(ships_layer)
    dock.activate_tool("polygon")
    click_map(qgis_canvas, xmin, ymin)
    click_map(qgis_canvas, xmax, ymin)
    click_map(qgis_canvas, (xmin + xmax) / 2, ymax)
    assert dock.query_parts == []
    click_map(qgis_canvas, xmin, ymax, Qt.MouseButton.RightButton)
    wait_for_tasks(dock)

    assert len(dock.query_parts) == 1
    geometry, negative, _crs = dock.query_parts[0]
    assert not negative
    assert geometry.asWkt().startswith("Polygon")
    assert dock.result_layer().featureCount() == dock.k_spin.value()


def test_selected_features_query_and_polygon_extent(dock, ships_layer, tmp_path, qgis_canvas):
    xmin, ymin, xmax, ymax = ship_query_bounds(ships_layer)
    polygons = QgsVectorLayer(f"Polygon?crs={ships_layer.crs().authid()}", "areas", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(xmin, ymin, xmax, ymax)))
    wide = ships_layer.extent()
    half = QgsFeature()
    half.setGeometry(QgsGeometry.fromRect(QgsRectangle(wide.xMinimum(), wide.center().y(),
                                                       wide.xMaximum(), wide.yMaximum())))
    polygons.dataProvider().addFeatures([feature, half])
    QgsProject.instance().addMapLayer(polygons)

    dock.raster_combo.setLayer(ships_layer)
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData(EXTENT_SELECTED))
    dock.extent_layer_combo.setLayer(polygons)
    polygons.selectByIds([2])
    build(dock, tmp_path / "index")
    assert dock.index is not None
    # Only tiles overlapping the northern half were indexed.
    for tile_id in range(dock.index.count):
        assert dock.index.tile_bounds(tile_id)[3] > wide.center().y()

    polygons.selectByIds([1])
    dock.query_layer_combo.setLayer(polygons)
    QTest.mouseClick(dock.use_selected_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)
    assert len(dock.query_parts) == 1
    assert dock.result_layer().featureCount() > 0


def test_export_button_uses_file_dialog(dock, ships_layer, tmp_path, qgis_canvas, monkeypatch):
    dock.raster_combo.setLayer(ships_layer)
    build(dock, tmp_path / "index")
    dock.k_spin.setValue(3)
    dock.activate_tool("rectangle")
    drag_rectangle(qgis_canvas, ship_query_bounds(ships_layer))
    wait_for_tasks(dock)
    chosen = tmp_path / "chosen"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *_args, **_kwargs: (str(chosen), ""))
    dock.export_format_combo.setCurrentText("GeoJSON")
    QTest.mouseClick(dock.export_button, Qt.MouseButton.LeftButton)

    written = QgsVectorLayer(str(tmp_path / "chosen.geojson"), "written", "ogr")
    assert written.isValid()
    assert written.featureCount() == 3
