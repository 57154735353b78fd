"""Fixtures of the dock tests: the ships clip on the canvas and a dock with the tiny test encoder."""

import pytest
from dock_testing import SHIPS_RASTER, wait_for_tasks, wait_until
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer

from lookalike.ui.dock import OTHER_ENCODER, LookalikeDockWidget


@pytest.fixture()
def ships_layer(shared_data, qgis_new_project, qgis_canvas):
    layer = QgsRasterLayer(str(shared_data / SHIPS_RASTER), "ships")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    qgis_canvas.resize(700, 340)
    # A hidden canvas keeps its initial map size; showing its window applies the new size.
    qgis_canvas.window().show()
    qgis_canvas.setDestinationCrs(layer.crs())
    qgis_canvas.setLayers([layer])
    qgis_canvas.setExtent(layer.extent())
    qgis_canvas.refresh()
    QgsApplication.processEvents()
    return layer


@pytest.fixture()
def dock(qgis_iface, qgis_new_project, repo_root):
    qgis_iface.messageBar().clear_messages()
    widget = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
    # Mouse clicks reach only visible buttons.
    widget.show()
    widget.encoder_combo.setCurrentIndex(widget.encoder_combo.findData(OTHER_ENCODER))
    widget.encoder_file.setFilePath(str(repo_root / "tests" / "data" / "tiny_encoder.onnx"))
    wait_until(lambda: widget.encoder_spec is not None and widget.encoder_spec.name == "tiny_test_encoder")
    yield widget
    wait_for_tasks(widget)
    widget.cleanup()
    widget.deleteLater()
    QgsApplication.processEvents()
