"""Helpers the dock tests share: showing a layer, waiting for tasks, message-bar texts, building,
and dragging a query box. ``tests/qgis/conftest.py`` has the fixtures.

Test modules import them by name (``from dock_testing import ...``): with pytest's importlib
import mode, test modules cannot import each other, so the shared part lives here.
"""

import time
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest

from lookalike.ui.dock import LookalikeDockWidget

SHIPS_RASTER = Path("geo/planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif")
# The same RapidEye clip as shipped in the repository.
SAMPLE_CLIP = Path("sample_data/1056417_2017-03-08_RE3_3A_Visual_clip.tif")
TASK_TIMEOUT_S = 180.0


def show_layer(canvas, layer: QgsRasterLayer) -> None:
    """Add ``layer`` to the project and show all of it on a 700 x 340 px canvas in its CRS."""
    QgsProject.instance().addMapLayer(layer)
    canvas.resize(700, 340)
    # A hidden canvas keeps its initial map size; showing its window applies the new size.
    canvas.window().show()
    canvas.setDestinationCrs(layer.crs())
    canvas.setLayers([layer])
    canvas.setExtent(layer.extent())
    canvas.refresh()
    QgsApplication.processEvents()


def wait_until(condition, timeout_s: float = TASK_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        QgsApplication.processEvents()
        time.sleep(0.01)


def wait_for_tasks(dock: LookalikeDockWidget, timeout_s: float = TASK_TIMEOUT_S) -> None:
    wait_until(lambda: not dock.running_tasks(), timeout_s)
    QgsApplication.processEvents()


def messages(qgis_iface, level) -> list:
    return qgis_iface.messageBar().get_messages(level)


def build(dock: LookalikeDockWidget, folder: Path) -> None:
    dock.index_folder.setFilePath(str(folder))
    dock.overlap_spin.setValue(50)
    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    assert dock.build_task is not None, dock.iface.messageBar().messages
    wait_for_tasks(dock)


def map_to_pixel(canvas, x: float, y: float) -> QPoint:
    point = canvas.getCoordinateTransform().transform(x, y)
    return QPoint(round(point.x()), round(point.y()))


def drag_rectangle(canvas, bounds, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    xmin, ymin, xmax, ymax = bounds
    start = map_to_pixel(canvas, xmin, ymax)
    end = map_to_pixel(canvas, xmax, ymin)
    viewport = canvas.viewport()
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, modifier, start)
    QTest.mouseMove(viewport, QPoint((start.x() + end.x()) // 2, (start.y() + end.y()) // 2))
    QTest.mouseMove(viewport, end)
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, modifier, end)


def ship_query_bounds(layer: QgsRasterLayer):
    # A box in the upper left part of the bay; any water-and-ship area serves the workflow.
    extent = layer.extent()
    width = extent.width()
    height = extent.height()
    return (
        extent.xMinimum() + 0.30 * width,
        extent.yMinimum() + 0.55 * height,
        extent.xMinimum() + 0.36 * width,
        extent.yMinimum() + 0.75 * height,
    )

