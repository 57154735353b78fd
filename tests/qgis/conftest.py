"""Fixtures of the QGIS tests: the ships clip on the canvas, a dock with the tiny test encoder, and
the plugin's Processing provider."""

from pathlib import Path

import pytest
from dock_testing import SAMPLE_CLIP, SHIPS_RASTER, show_layer, wait_for_tasks, wait_until
from processing_testing import use_qgis_processing_package
from qgis.core import QgsApplication, QgsRasterLayer

from lookalike.processing.provider import LookalikeProvider
from lookalike.ui.dock import OTHER_ENCODER, LookalikeDockWidget


def _shown_raster(path, canvas) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), "ships")
    assert layer.isValid()
    show_layer(canvas, layer)
    return layer


@pytest.fixture()
def ships_layer(shared_data, qgis_new_project, qgis_canvas):
    """The RapidEye clip from the shared data, shown on the canvas."""
    return _shown_raster(shared_data / SHIPS_RASTER, qgis_canvas)


@pytest.fixture()
def ships_clip(repo_root, qgis_new_project, qgis_canvas):
    """The RapidEye clip shipped in ``sample_data``, shown on the canvas; needs no shared data."""
    return _shown_raster(repo_root / SAMPLE_CLIP, qgis_canvas)


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
    # A test may leave a build or search running; the next test needs the task manager idle.
    for task in widget.running_tasks():
        task.cancel()
    wait_for_tasks(widget)
    widget.cleanup()
    widget.deleteLater()
    QgsApplication.processEvents()


# -- Processing


@pytest.fixture(scope="module")
def provider(qgis_app):
    use_qgis_processing_package()
    from processing.core.Processing import Processing

    Processing.initialize()
    lookalike_provider = LookalikeProvider()
    assert QgsApplication.processingRegistry().addProvider(lookalike_provider)
    yield lookalike_provider
    QgsApplication.processingRegistry().removeProvider(lookalike_provider)


@pytest.fixture(scope="session")
def tiny_encoder(repo_root: Path) -> str:
    return str(repo_root / "tests" / "data" / "tiny_encoder.onnx")


@pytest.fixture(scope="session")
def ships_raster(shared_data: Path) -> str:
    return str(shared_data / SHIPS_RASTER)
