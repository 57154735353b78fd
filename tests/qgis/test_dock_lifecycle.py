"""The dock's map tools and life cycle: closing a polygon, closing the dock, a new project while
tasks run, and unloading the plugin.

Runs the real dock and map tools offscreen on the RapidEye clip in sample_data, with the tiny
test encoder where a test builds an index.
"""

from dock_testing import build, drag_rectangle, map_to_pixel, messages, ship_query_bounds, wait_for_tasks, wait_until
from qgis.core import Qgis, QgsApplication, QgsPointXY, QgsProject
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import QEvent, Qt
from qgis.PyQt.QtGui import QMouseEvent
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QPushButton

import lookalike
from lookalike.ui.dock import OTHER_ENCODER


def click_map(canvas, point, button=Qt.MouseButton.LeftButton) -> None:
    QTest.mouseClick(canvas.viewport(), button, Qt.KeyboardModifier.NoModifier, map_to_pixel(canvas, *point))


def double_click_map(canvas, point) -> None:
    """Send what a real double click sends: press, release, double-click, release.

    In Qt 5, QTest.mouseDClick sends no release events, so the events are built here.
    """
    viewport = canvas.viewport()
    pixel = map_to_pixel(canvas, *point)
    QTest.mouseClick(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pixel)
    double_click = QMouseEvent(
        QEvent.Type.MouseButtonDblClick,
        pixel,
        Qt.MouseButton.LeftButton,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    QgsApplication.sendEvent(viewport, double_click)
    release = QMouseEvent(
        QEvent.Type.MouseButtonRelease,
        pixel,
        Qt.MouseButton.LeftButton,
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
    )
    QgsApplication.sendEvent(viewport, release)
    QgsApplication.processEvents()


def triangle(layer, corner_fraction_x: float, corner_fraction_y: float):
    """Three map points of a triangle 600 m wide whose lower left corner is at the given fractions."""
    extent = layer.extent()
    x = extent.xMinimum() + corner_fraction_x * extent.width()
    y = extent.yMinimum() + corner_fraction_y * extent.height()
    return [(x, y), (x + 600.0, y), (x + 300.0, y + 500.0)]


def ring_vertices(geometry):
    """The polygon's vertices without the ring's closing copy of the first one."""
    ring = geometry.asPolygon()[0]
    return ring[:-1]


def assert_near(vertex: QgsPointXY, point, tolerance: float) -> None:
    assert abs(vertex.x() - point[0]) <= tolerance, (vertex.asWkt(), point)
    assert abs(vertex.y() - point[1]) <= tolerance, (vertex.asWkt(), point)


def record_polygons(dock) -> list:
    drawn = []
    dock.map_tools["polygon"].queryDrawn.connect(lambda geometry, _negative: drawn.append(geometry))
    return drawn


def rubber_band_count(canvas) -> int:
    return sum(1 for item in canvas.scene().items() if isinstance(item, QgsRubberBand))


def map_tool_count(canvas) -> int:
    return sum(1 for child in canvas.children() if isinstance(child, QgsMapTool))


def delete_later_objects() -> None:
    # Outside a running event loop, processEvents() does not run deleteLater() requests.
    QgsApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QgsApplication.processEvents()


def show_plugin_dock(qgis_iface):
    plugin = lookalike.classFactory(qgis_iface)
    plugin.initGui()
    plugin.actions[0].setChecked(True)
    # The dock reads its default encoder in a task. Waiting for it keeps one load-unload cycle's
    # task from running into the next.
    wait_until(lambda: not plugin.dock.running_tasks())
    return plugin


# -- polygon tool ------------------------------------------------------------------------------


def test_polygon_double_click_leaves_no_vertex(dock, ships_clip, qgis_canvas):
    drawn = record_polygons(dock)
    tolerance = qgis_canvas.mapUnitsPerPixel()
    first = triangle(ships_clip, 0.2, 0.5)
    second = triangle(ships_clip, 0.6, 0.2)
    dock.activate_tool("polygon")

    click_map(qgis_canvas, first[0])
    click_map(qgis_canvas, first[1])
    double_click_map(qgis_canvas, first[2])

    assert len(drawn) == 1
    vertices = ring_vertices(drawn[0])
    assert len(vertices) == 3
    for vertex, clicked in zip(vertices, first):
        assert_near(vertex, clicked, tolerance)

    for point in second:
        click_map(qgis_canvas, point)
    click_map(qgis_canvas, second[-1], Qt.MouseButton.RightButton)

    assert len(drawn) == 2
    vertices = ring_vertices(drawn[1])
    assert len(vertices) == 3
    for vertex, clicked in zip(vertices, second):
        assert_near(vertex, clicked, tolerance)


def test_polygon_repeated_click_adds_one_vertex(dock, ships_clip, qgis_canvas):
    drawn = record_polygons(dock)
    points = triangle(ships_clip, 0.2, 0.5)
    dock.activate_tool("polygon")

    # The same spot twice, then the first vertex again to close the ring.
    for point in (points[0], points[1], points[1], points[2], points[0]):
        click_map(qgis_canvas, point)
    click_map(qgis_canvas, points[0], Qt.MouseButton.RightButton)

    assert len(drawn) == 1
    assert len(ring_vertices(drawn[0])) == 3


def test_polygon_without_area_shows_message(dock, ships_clip, qgis_canvas, qgis_iface):
    drawn = record_polygons(dock)
    x0, y0, x1, _y1 = ship_query_bounds(ships_clip)
    dock.activate_tool("polygon")
    qgis_iface.messageBar().clear_messages()

    for x in (x0, (x0 + x1) / 2, x1):
        click_map(qgis_canvas, (x, y0))
    click_map(qgis_canvas, (x1, y0), Qt.MouseButton.RightButton)

    assert drawn == []
    assert dock.query_parts == []
    warnings = messages(qgis_iface, Qgis.MessageLevel.Warning)
    assert len(warnings) == 1
    assert "no area" in warnings[0]
    assert "at least three points" in warnings[0]


def test_polygon_with_crossing_edges_is_drawn(dock, ships_clip, qgis_canvas, qgis_iface):
    # A figure-eight of two equal lobes, whose signed areas cancel.
    drawn = record_polygons(dock)
    x0, y0, x1, y1 = ship_query_bounds(ships_clip)
    dock.activate_tool("polygon")
    qgis_iface.messageBar().clear_messages()

    for point in ((x0, y0), (x1, y1), (x1, y0), (x0, y1)):
        click_map(qgis_canvas, point)
    click_map(qgis_canvas, (x0, y1), Qt.MouseButton.RightButton)

    assert len(drawn) == 1
    assert len(ring_vertices(drawn[0])) == 4
    assert not any("no area" in text for text in messages(qgis_iface, Qgis.MessageLevel.Warning))


def test_polygon_of_two_points_shows_message(dock, ships_clip, qgis_canvas, qgis_iface):
    drawn = record_polygons(dock)
    points = triangle(ships_clip, 0.2, 0.5)
    dock.activate_tool("polygon")
    qgis_iface.messageBar().clear_messages()

    click_map(qgis_canvas, points[0])
    click_map(qgis_canvas, points[1])
    click_map(qgis_canvas, points[1], Qt.MouseButton.RightButton)

    assert drawn == []
    assert any("no area" in text for text in messages(qgis_iface, Qgis.MessageLevel.Warning))


def test_right_click_without_polygon_is_silent(dock, ships_clip, qgis_canvas, qgis_iface):
    dock.activate_tool("polygon")
    qgis_iface.messageBar().clear_messages()

    click_map(qgis_canvas, triangle(ships_clip, 0.2, 0.5)[0], Qt.MouseButton.RightButton)

    assert messages(qgis_iface, Qgis.MessageLevel.Warning) == []


# -- new project while tasks run ---------------------------------------------------------------


def test_new_project_discards_running_search(dock, ships_clip, qgis_canvas, qgis_iface, tmp_path):
    # Clearing the project deletes the layer, so its bounds are read now.
    query_bounds = ship_query_bounds(ships_clip)
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build(dock, folder)
    dock.activate_tool("rectangle")
    drag_rectangle(qgis_canvas, query_bounds)
    assert dock.search_task is not None
    qgis_iface.messageBar().clear_messages()

    QgsProject.instance().clear()
    wait_for_tasks(dock)

    assert [layer.name() for layer in QgsProject.instance().mapLayers().values()] == []
    assert dock.result_layer() is None
    assert dock.results_table.rowCount() == 0
    assert dock.index is None
    assert dock.query_parts == []
    assert dock.search_task is None
    assert dock.search_button.isEnabled()
    assert messages(qgis_iface, Qgis.MessageLevel.Critical) == []

    # The discarded search does not block the next one.
    dock.open_index(str(folder))
    wait_for_tasks(dock)
    assert dock.index is not None
    drag_rectangle(qgis_canvas, query_bounds)
    wait_for_tasks(dock)
    assert dock.result_layer() is not None


def test_new_project_discards_opening_index(dock, ships_clip, tmp_path):
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build(dock, folder)
    dock.open_index(str(folder))

    QgsProject.instance().clear()
    wait_for_tasks(dock)

    assert dock.index is None
    stored, found = QgsProject.instance().readEntry("lookalike", "/index_folder")
    assert not found, stored


def test_new_project_drops_half_drawn_polygon(dock, ships_clip, qgis_canvas):
    drawn = record_polygons(dock)
    old = triangle(ships_clip, 0.2, 0.5)
    new = triangle(ships_clip, 0.6, 0.2)
    dock.activate_tool("polygon")
    click_map(qgis_canvas, old[0])
    click_map(qgis_canvas, old[1])
    bands_while_drawing = rubber_band_count(qgis_canvas)

    QgsProject.instance().clear()

    assert rubber_band_count(qgis_canvas) == bands_while_drawing - 1
    for point in new:
        click_map(qgis_canvas, point)
    click_map(qgis_canvas, new[-1], Qt.MouseButton.RightButton)
    assert len(drawn) == 1
    assert len(ring_vertices(drawn[0])) == 3


# -- closing the dock ----------------------------------------------------------------------------


def test_closing_dock_releases_map_tool(dock, ships_clip, qgis_canvas):
    drawn = record_polygons(dock)
    points = triangle(ships_clip, 0.2, 0.5)
    bands_before = rubber_band_count(qgis_canvas)
    dock.activate_tool("polygon")
    click_map(qgis_canvas, points[0])
    click_map(qgis_canvas, points[1])
    assert rubber_band_count(qgis_canvas) == bands_before + 1

    dock.close()

    assert qgis_canvas.mapTool() is None
    assert rubber_band_count(qgis_canvas) == bands_before
    assert not dock.tool_buttons["polygon"].defaultAction().isChecked()

    # Open again: the polygon started before closing is gone.
    dock.show()
    dock.activate_tool("polygon")
    for point in points:
        click_map(qgis_canvas, point)
    click_map(qgis_canvas, points[-1], Qt.MouseButton.RightButton)
    assert len(drawn) == 1
    assert len(ring_vertices(drawn[0])) == 3


def test_hidden_plugin_dock_stops_searching(qgis_iface, qgis_new_project, qgis_canvas, ships_clip):
    plugin = show_plugin_dock(qgis_iface)
    dock = plugin.dock
    try:
        dock.activate_tool("point")
        assert qgis_canvas.mapTool() is dock.map_tools["point"]

        plugin.actions[0].setChecked(False)
        QgsApplication.processEvents()

        assert not dock.isVisible()
        assert qgis_canvas.mapTool() is None
        click_map(qgis_canvas, ships_clip.extent().center())
        wait_for_tasks(dock)
        assert dock.query_parts == []
        assert dock.search_task is None
    finally:
        plugin.unload()


def test_dock_behind_another_tab_stays_open(qgis_iface, qgis_new_project):
    plugin = show_plugin_dock(qgis_iface)
    try:
        # Qt hides a dock whose tab another panel covers, without closing it. The test interface
        # docks nothing into its main window, so the hiding is done here.
        plugin.dock.hide()
        QgsApplication.processEvents()
        assert plugin.actions[0].isChecked()

        plugin.dock.show()
        plugin.dock.close()
        QgsApplication.processEvents()
        assert not plugin.actions[0].isChecked()

        plugin.actions[0].setChecked(True)
        QgsApplication.processEvents()
        assert plugin.dock.isVisible()
    finally:
        plugin.unload()


# -- unloading the plugin ----------------------------------------------------------------------


def project_and_canvas_receivers(canvas) -> dict:
    project = QgsProject.instance()
    return {
        "project.cleared": project.receivers(project.cleared),
        "project.readProject": project.receivers(project.readProject),
        "project.layerWillBeRemoved": project.receivers(project.layerWillBeRemoved),
        "canvas.mapToolSet": canvas.receivers(canvas.mapToolSet),
    }


def test_unload_removes_tools_bands_and_connections(qgis_iface, qgis_new_project, qgis_canvas, ships_clip):
    delete_later_objects()
    tools_before = map_tool_count(qgis_canvas)
    bands_before = rubber_band_count(qgis_canvas)
    receivers_before = project_and_canvas_receivers(qgis_canvas)
    points = triangle(ships_clip, 0.2, 0.5)

    for _cycle in range(3):
        plugin = show_plugin_dock(qgis_iface)
        dock = plugin.dock
        tools = list(dock.map_tools.values())
        # A query part on the overlay and a half-drawn polygon leave rubber bands behind.
        dock.activate_tool("rectangle")
        drag_rectangle(qgis_canvas, ship_query_bounds(ships_clip))
        dock.activate_tool("polygon")
        click_map(qgis_canvas, points[0])
        click_map(qgis_canvas, points[1])
        assert rubber_band_count(qgis_canvas) > bands_before

        plugin.unload()
        delete_later_objects()

        assert qgis_canvas.mapTool() not in tools
        assert rubber_band_count(qgis_canvas) == bands_before

    assert map_tool_count(qgis_canvas) == tools_before
    assert project_and_canvas_receivers(qgis_canvas) == receivers_before


def test_cleanup_twice_is_harmless(dock):
    dock.cleanup()
    delete_later_objects()

    # Both would touch the deleted map tools if cleanup or closing did not check for them.
    dock.cleanup()
    dock.close()

    assert not dock.isVisible()


def start_long_build(qgis_iface, ships_clip, repo_root, tmp_path):
    """Open the plugin's dock with the tiny encoder and start a build that has embedded its first batch."""
    plugin = show_plugin_dock(qgis_iface)
    dock = plugin.dock
    dock.encoder_combo.setCurrentIndex(dock.encoder_combo.findData(OTHER_ENCODER))
    dock.encoder_file.setFilePath(str(repo_root / "tests" / "data" / "tiny_encoder.onnx"))
    wait_until(lambda: dock.encoder_spec is not None and dock.encoder_spec.name == "tiny_test_encoder")
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    # About 3,500 tiles, so the build is still running when the test acts on it.
    dock.gsd_spin.setValue(1.25)
    task = dock.start_build()
    progress = []
    task.tileProgress.connect(progress.append)
    wait_until(lambda: any(item.tiles_done > 0 for item in progress))
    return plugin


def test_unload_during_build_reaches_no_widget(qgis_iface, qgis_new_project, ships_clip, repo_root, tmp_path,
                                               monkeypatch):
    import sys

    plugin = start_long_build(qgis_iface, ships_clip, repo_root, tmp_path)
    uncaught = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, _trace: uncaught.append(f"{kind.__name__}: {value}"))

    plugin.unload()
    delete_later_objects()
    wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0)

    assert uncaught == []


def test_resume_message_leaves_with_plugin(qgis_iface, qgis_new_project, ships_clip, repo_root, tmp_path):
    plugin = start_long_build(qgis_iface, ships_clip, repo_root, tmp_path)
    dock = plugin.dock
    dock.cancel_build()
    wait_until(lambda: dock.build_task is None)
    bar = qgis_iface.messageBar()
    assert any(item.findChild(QPushButton, "lookalikeMessageButton") for item in bar.items())

    plugin.unload()
    delete_later_objects()

    assert not any(item.findChild(QPushButton, "lookalikeMessageButton") for item in bar.items())
