"""Regenerate the user guide's screenshots (docs/img/dock-*.png) from a real run of the dock.

Runs headless (``QT_QPA_PLATFORM=offscreen``): a main window with a map canvas, a message bar
and the Lookalike dock. It indexes the shipped RapidEye clip with the bundled encoder, drags a
rectangle around one ship with real mouse events, marks two results and searches again, and
grabs the window and the dock with ``QWidget.grab()`` after each step.

Usage: ``QT_QPA_PLATFORM=offscreen .venv/bin/python tools/make_screenshots.py [--output-folder docs/img]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from devimport import REPO_ROOT, import_lookalike

import_lookalike()

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer  # noqa: E402
from qgis.gui import QgsLayerTreeMapCanvasBridge, QgsMapCanvas, QgsMessageBar  # noqa: E402
from qgis.PyQt.QtCore import QPoint, Qt  # noqa: E402
from qgis.PyQt.QtGui import QImage  # noqa: E402
from qgis.PyQt.QtTest import QTest  # noqa: E402
from qgis.PyQt.QtWidgets import QGroupBox, QMainWindow, QVBoxLayout, QWidget  # noqa: E402

SAMPLE_RASTER = REPO_ROOT / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif"
# The demo's settings (tools/run_demo.py): 64-pixel tiles (320 m) upsampled to the encoder's
# 224 px, so 320 / 224 m per encoder pixel, and 75 % overlap.
GSD_M = 320.0 / 224.0
OVERLAP_PERCENT = 75
MATCHES_K = 8
# Box around the north-west ship in EPSG:32610 metres, as in tools/run_demo.py.
QUERY_BOUNDS_M = (557670.0, 4176095.0, 557780.0, 4176355.0)
WINDOW_SIZE_PX = (1180, 720)
DOCK_WIDTH_PX = 400
TIMEOUT_S = 600.0


class HeadlessInterface:
    """The part of ``QgisInterface`` that the dock uses, backed by real canvas and message-bar widgets."""

    def __init__(self, window: QMainWindow, canvas: QgsMapCanvas, bar: QgsMessageBar) -> None:
        self._window = window
        self._canvas = canvas
        self._bar = bar

    def mainWindow(self) -> QMainWindow:  # noqa: N802 - QgisInterface API
        return self._window

    def mapCanvas(self) -> QgsMapCanvas:  # noqa: N802 - QgisInterface API
        return self._canvas

    def messageBar(self) -> QgsMessageBar:  # noqa: N802 - QgisInterface API
        return self._bar


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dock did not finish within {timeout_s} s")
        QgsApplication.processEvents()
        time.sleep(0.02)


def settle(canvas: QgsMapCanvas, dock) -> None:
    """Wait for the dock's tasks and the canvas render, so a grab shows the finished state."""
    wait_until(lambda: not dock.running_tasks())
    canvas.refresh()
    QgsApplication.processEvents()
    wait_until(lambda: not canvas.isDrawing())
    for _ in range(5):
        QgsApplication.processEvents()
        time.sleep(0.05)


def save(widget: QWidget, path: Path) -> None:
    # An 8-bit palette keeps the PNGs small; the imagery is mostly flat water.
    image = widget.grab().toImage().convertToFormat(QImage.Format.Format_Indexed8)
    if not image.save(str(path), "PNG", 9):
        raise OSError(f"could not write {path}")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def group_box(dock, title_start: str) -> QGroupBox:
    for box in dock.findChildren(QGroupBox):
        if box.title().startswith(title_start):
            return box
    raise LookupError(f"no group box titled {title_start!r}")


def drag_rectangle(canvas: QgsMapCanvas, bounds: Sequence[float]) -> None:
    transform = canvas.getCoordinateTransform()
    top_left = transform.transform(bounds[0], bounds[3])
    bottom_right = transform.transform(bounds[2], bounds[1])
    start = QPoint(round(top_left.x()), round(top_left.y()))
    end = QPoint(round(bottom_right.x()), round(bottom_right.y()))
    viewport = canvas.viewport()
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    QTest.mouseMove(viewport, end)
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, end)


def make_screenshots(output_folder: Path) -> None:
    from lookalike.gis.logging_bridge import install_message_log_handler
    from lookalike.ui.dock import LookalikeDockWidget
    from lookalike.ui.results import Relevance

    install_message_log_handler()
    window = QMainWindow()
    window.resize(*WINDOW_SIZE_PX)
    central = QWidget()
    layout = QVBoxLayout(central)
    layout.setContentsMargins(0, 0, 0, 0)
    bar = QgsMessageBar()
    canvas = QgsMapCanvas()
    layout.addWidget(bar)
    layout.addWidget(canvas, 1)
    window.setCentralWidget(central)
    iface = HeadlessInterface(window, canvas, bar)

    # The bridge puts every project layer on the canvas, as QGIS does, so result layers show.
    bridge = QgsLayerTreeMapCanvasBridge(QgsProject.instance().layerTreeRoot(), canvas)
    layer = QgsRasterLayer(str(SAMPLE_RASTER), "RapidEye San Francisco Bay")
    QgsProject.instance().addMapLayer(layer)
    canvas.setDestinationCrs(layer.crs())

    dock = LookalikeDockWidget(iface, window)
    dock.setMinimumWidth(DOCK_WIDTH_PX)
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    window.show()
    canvas.setExtent(layer.extent())
    wait_until(lambda: dock.encoder_spec is not None)

    with tempfile.TemporaryDirectory() as scratch:
        dock.raster_combo.setLayer(layer)
        dock.gsd_spin.setValue(GSD_M)
        dock.overlap_spin.setValue(OVERLAP_PERCENT)
        dock.index_folder.setFilePath(str(Path(scratch) / "ships_index"))
        QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
        settle(canvas, dock)
        if dock.index is None:
            raise RuntimeError(f"the build failed: {dock.status_label.text()}")
        save(group_box(dock, "1"), output_folder / "dock-build.png")

        dock.k_spin.setValue(MATCHES_K)
        dock.activate_tool("rectangle")
        drag_rectangle(canvas, QUERY_BOUNDS_M)
        settle(canvas, dock)
        dock.widget().ensureWidgetVisible(group_box(dock, "3"))
        save(window, output_folder / "dock-results.png")
        save(group_box(dock, "3"), output_folder / "dock-results-table.png")

        # The analyst confirms the best match and rejects the weakest, then searches again.
        dock.results_table.set_relevance(dock.matches[0].tile_id, Relevance.RELEVANT)
        dock.results_table.set_relevance(dock.matches[-1].tile_id, Relevance.NOT_RELEVANT)
        QTest.mouseClick(dock.search_button, Qt.MouseButton.LeftButton)
        settle(canvas, dock)
        dock.threshold_slider.setValue(dock.threshold_slider.maximum() // 3)
        settle(canvas, dock)
        save(window, output_folder / "dock-rerun.png")

        dock.cleanup()
        QgsProject.instance().clear()
        del bridge
    # Widgets still alive when exitQgis() runs crash the interpreter on exit, so they go first.
    window.close()
    window.deleteLater()
    QgsApplication.processEvents()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-folder", type=Path, default=REPO_ROOT / "docs" / "img",
                        help="folder for the PNG files (default: docs/img)")
    args = parser.parse_args(argv)
    args.output_folder.mkdir(parents=True, exist_ok=True)
    application = QgsApplication([], True)
    application.initQgis()
    try:
        make_screenshots(args.output_folder)
    finally:
        application.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
