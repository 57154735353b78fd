"""The dock's index state around builds: cancelled builds, stale Resume buttons, project restore,
GSD limits and folders that hold another program's manifest.

Runs the real dock offscreen on the RapidEye ships clip in ``sample_data`` with the tiny test
encoder (32 px input, 5 m raster pixels), so one build takes a few seconds.
"""

import time
from pathlib import Path

import pytest
from dock_testing import SAMPLE_CLIP as SHIPS_CLIP
from dock_testing import TASK_TIMEOUT_S, show_layer, wait_for_tasks, wait_until
from osgeo import gdal
from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QMessageBox, QPushButton

from lookalike.core.index import TileIndex, first_grid_in
from lookalike.core.pipeline import BuildParameters, build_index
from lookalike.gis.tasks import TaskOutcome
from lookalike.ui import jobs
from lookalike.ui.dock import OTHER_ENCODER, LookalikeDockWidget

TINY_ENCODER = Path("tests/data/tiny_encoder.onnx")
# The ships clip has about 3,500 tiles at this GSD, so a build has many batches to cancel between.
FINE_GSD_M = 1.25


@pytest.fixture()
def questions(monkeypatch):
    """Record every QMessageBox.question text. The patched dialog returns ``questions.answer`` (Yes at first)."""

    class Recorder(list):
        answer = QMessageBox.StandardButton.Yes

    recorded = Recorder()

    def question(_parent, _title, text, *_args, **_kwargs):
        recorded.append(text)
        return recorded.answer

    monkeypatch.setattr(QMessageBox, "question", question)
    return recorded


class BuildHold:
    """While ``active``, dock builds wait after their first embedded batch until they are cancelled."""

    active = False


@pytest.fixture()
def build_hold(monkeypatch) -> BuildHold:
    """Hold dock builds that a test cancels, which the small clip could otherwise finish first."""
    hold = BuildHold()
    real_build_index = jobs.build_index

    def build_index_held(params, progress=None, is_cancelled=None):
        def report(item):
            progress(item)
            deadline = time.monotonic() + TASK_TIMEOUT_S
            while hold.active and item.tiles_done > 0 and not is_cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)

        return real_build_index(params, progress=report, is_cancelled=is_cancelled)

    monkeypatch.setattr(jobs, "build_index", build_index_held)
    return hold


def build_at(dock: LookalikeDockWidget, folder: Path, gsd_m: float, overlap_percent: int = 0) -> None:
    dock.index_folder.setFilePath(str(folder))
    wait_for_tasks(dock)
    dock.gsd_spin.setValue(gsd_m)
    dock.overlap_spin.setValue(overlap_percent)
    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    assert dock.build_task is not None, dock.iface.messageBar().messages
    wait_for_tasks(dock)


def start_held_build(dock: LookalikeDockWidget, hold: BuildHold):
    """Click Build index with ``hold`` active; return the build task once its first batch is embedded."""
    hold.active = True
    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    task = dock.build_task
    assert task is not None, dock.iface.messageBar().messages
    progress = []
    task.tileProgress.connect(progress.append)
    wait_until(lambda: any(item.tiles_done > 0 for item in progress))
    return task


def cancel_build_at(dock: LookalikeDockWidget, gsd_m: float, hold: BuildHold) -> None:
    """Start a build at ``gsd_m`` with the Build button and cancel it after its first batch."""
    dock.gsd_spin.setValue(gsd_m)
    try:
        task = start_held_build(dock, hold)
        QTest.mouseClick(dock.cancel_button, Qt.MouseButton.LeftButton)
        wait_for_tasks(dock)
    finally:
        hold.active = False
    assert task.outcome is TaskOutcome.CANCELLED


def current_resume_item(bar):
    item = bar.currentItem()
    assert item is not None
    assert "cancelled" in item.text()
    return item


def message_is_gone(bar, item) -> bool:
    return sip.isdeleted(item) or item not in bar.items()


# -- cancel and resume ------------------------------------------------------------------------------


def test_cancelled_replace_reopens_index(dock, ships_clip, tmp_path, questions, build_hold):
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build_at(dock, folder, gsd_m=40.0)
    count = dock.index.count

    cancel_build_at(dock, FINE_GSD_M, build_hold)

    assert len(questions) == 1
    assert "already contains an index" in questions[0]
    assert TileIndex.open(folder).count == count
    assert dock.index is not None
    assert Path(dock.index.folder) == folder
    assert dock.index.count == count
    assert "Index open" in dock.status_label.text()


def test_build_of_closed_project_opens_nothing(dock, ships_clip, tmp_path, qgis_iface, build_hold):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.gsd_spin.setValue(FINE_GSD_M)
    task = start_held_build(dock, build_hold)

    QgsProject.instance().clear()
    build_hold.active = False
    wait_for_tasks(dock)

    assert task.outcome is TaskOutcome.SUCCEEDED
    assert dock.index is None
    successes = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success)
    assert any("project you closed is built" in text for text in successes), successes


def test_rebuild_of_reopened_project_folder_reopens(dock, ships_clip, tmp_path, qgis_iface, questions,
                                                    build_hold):
    # The analyst saves the project, starts a rebuild of its index folder and opens the project
    # again while the build runs: the project opens the old index from that folder.
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build_at(dock, folder, gsd_m=40.0)
    old_count = dock.index.count
    project_path = tmp_path / "survey.qgz"
    QgsProject.instance().write(str(project_path))
    dock.gsd_spin.setValue(20.0)
    task = start_held_build(dock, build_hold)

    QgsProject.instance().clear()
    QgsProject.instance().read(str(project_path))
    wait_until(lambda: dock.index is not None)
    assert dock.index.count == old_count
    build_hold.active = False
    wait_for_tasks(dock)

    assert task.outcome is TaskOutcome.SUCCEEDED
    assert TileIndex.open(folder).count != old_count
    assert dock.index is not None
    assert dock.index.count == TileIndex.open(folder).count
    assert f"Index open: {dock.index.count} tiles" in dock.status_label.text()
    infos = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
    assert any("it is open again" in text for text in infos), infos


def test_resume_names_the_settings_it_keeps(dock, ships_clip, tmp_path, qgis_iface, build_hold):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.overlap_spin.setValue(50)
    bar = qgis_iface.messageBar()
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    resume_item = current_resume_item(bar)
    assert "overlap 50 %, bands auto" in resume_item.text()
    dock.overlap_spin.setValue(25)

    QTest.mouseClick(resume_item.findChild(QPushButton, "lookalikeMessageButton"), Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    infos = bar.get_messages(Qgis.MessageLevel.Info)
    assert any("GSD 1.25 m, overlap 50 %, bands auto)" in text for text in infos), infos
    assert first_grid_in(tmp_path / "index").overlap_fraction == 0.5


def test_other_settings_ask_before_discarding_tiles(dock, ships_clip, tmp_path, qgis_iface, questions,
                                                    build_hold):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.overlap_spin.setValue(0)
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    dock.overlap_spin.setValue(50)

    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert len(questions) == 1
    assert "It differs in the overlap." in questions[0]
    assert first_grid_in(tmp_path / "index").overlap_fraction == 0.5
    assert not (tmp_path / "index.partial").exists()
    # The analyst chose to discard those tiles, so no warning repeats it.
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert not any("were discarded" in text for text in warnings), warnings


def test_declined_discard_keeps_tiles(dock, ships_clip, tmp_path, qgis_iface, questions, build_hold):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.overlap_spin.setValue(0)
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    chunks = sorted(path.name for path in (tmp_path / "index.partial").iterdir())
    dock.overlap_spin.setValue(50)
    questions.answer = QMessageBox.StandardButton.No

    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert len(questions) == 1
    assert sorted(path.name for path in (tmp_path / "index.partial").iterdir()) == chunks
    assert dock.build_task is None
    infos = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
    assert any("finished tiles in" in text and "are kept" in text for text in infos), infos


def test_new_project_drops_resume(dock, ships_clip, tmp_path, qgis_iface, build_hold):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    bar = qgis_iface.messageBar()
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    resume_item = current_resume_item(bar)

    QgsProject.instance().clear()

    assert message_is_gone(bar, resume_item)
    assert dock.build_task is None


def test_cancel_after_new_project_offers_no_resume(dock, ships_clip, tmp_path, qgis_iface, build_hold):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.gsd_spin.setValue(FINE_GSD_M)
    task = start_held_build(dock, build_hold)
    QgsProject.instance().clear()
    qgis_iface.messageBar().clear_messages()

    QTest.mouseClick(dock.cancel_button, Qt.MouseButton.LeftButton)
    build_hold.active = False
    wait_for_tasks(dock)

    assert task.outcome is TaskOutcome.CANCELLED
    buttons = [item.findChild(QPushButton, "lookalikeMessageButton") for item in qgis_iface.messageBar().items()]
    assert not any(button is not None and button.text() == "Resume" for button in buttons)
    infos = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
    assert any("started in the project you closed was cancelled" in text for text in infos), infos
    assert dock.status_label.text() == "No index open."


def test_cancelled_append_reopens_index(dock, ships_clip, qgis_canvas, tmp_path, build_hold):
    corner = tmp_path / "ships_corner.tif"
    gdal.Translate(str(corner), str(ships_clip.source()), srcWin=[0, 0, 120, 120])
    corner_layer = QgsRasterLayer(str(corner), "ships corner")
    show_layer(qgis_canvas, corner_layer)
    dock.raster_combo.setLayer(corner_layer)
    folder = tmp_path / "index"
    build_at(dock, folder, gsd_m=FINE_GSD_M)
    count = dock.index.count

    dock.raster_combo.setLayer(ships_clip)
    dock.add_to_index_check.setChecked(True)
    cancel_build_at(dock, FINE_GSD_M, build_hold)

    assert TileIndex.open(folder).count == count
    assert dock.index is not None
    assert dock.index.count == count
    assert len(dock.index.sources) == 1


def test_newer_build_removes_stale_resume(dock, ships_clip, tmp_path, qgis_iface, questions,
                                          build_hold):
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build_at(dock, folder, gsd_m=40.0)
    bar = qgis_iface.messageBar()
    bar.clearWidgets()
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    resume_item = current_resume_item(bar)

    build_at(dock, folder, gsd_m=20.0)
    newer_count = dock.index.count

    assert len(questions) == 3
    assert "Delete those tiles and build with the current settings?" in questions[2]
    assert message_is_gone(bar, resume_item)
    assert dock.index.count == newer_count
    assert TileIndex.open(folder).count == newer_count


def test_stale_resume_call_starts_nothing(dock, ships_clip, tmp_path, qgis_iface, questions,
                                          build_hold):
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build_at(dock, folder, gsd_m=40.0)
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    cancelled_request = dock.last_build_request
    build_at(dock, folder, gsd_m=20.0)
    newer_count = dock.index.count
    qgis_iface.messageBar().clear_messages()

    assert dock.resume_build(cancelled_request, None) is None

    assert dock.build_task is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("a newer build of" in text and str(folder) in text for text in warnings)
    assert TileIndex.open(folder).count == newer_count


def test_resume_asks_when_index_changed(dock, ships_clip, repo_root, tmp_path, qgis_iface, questions,
                                        build_hold):
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    build_at(dock, folder, gsd_m=40.0)
    bar = qgis_iface.messageBar()
    bar.clearWidgets()
    cancel_build_at(dock, FINE_GSD_M, build_hold)
    resume_item = current_resume_item(bar)
    # Another program (here the engine itself) replaces the index while the Resume button waits.
    params = BuildParameters(
        source_paths=(str(repo_root / SHIPS_CLIP),),
        index_folder=str(folder),
        encoder_path=str(repo_root / TINY_ENCODER),
        tile_ground_size_m=20.0 * 32,
        overlap_fraction=0.0,
        overwrite_existing_index=True,
        discard_other_checkpoints=True,
    )
    replaced_count = build_index(params).tiles_embedded
    questions.clear()
    questions.answer = QMessageBox.StandardButton.No

    QTest.mouseClick(resume_item.findChild(QPushButton, "lookalikeMessageButton"), Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert len(questions) == 1
    assert "changed after this build was cancelled" in questions[0]
    assert dock.build_task is None
    assert TileIndex.open(folder).count == replaced_count


# -- project restore --------------------------------------------------------------------------------


def test_project_restores_zero_overlap(dock, ships_clip, tmp_path):
    dock.raster_combo.setLayer(ships_clip)
    build_at(dock, tmp_path / "index", gsd_m=20.0, overlap_percent=0)
    project_path = tmp_path / "ships.qgz"
    assert QgsProject.instance().write(str(project_path))
    dock.overlap_spin.setValue(50)

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(dock)

    assert dock.overlap_spin.value() == 0
    assert dock.index is not None


@pytest.mark.parametrize("panel_open_before_project", [True, False])
def test_project_gsd_beats_encoder_default(qgis_iface, qgis_new_project, ships_clip, tmp_path,
                                           panel_open_before_project):
    # The bundled encoder suggests its own GSD (0.5 m/px) and finishes loading after the project is restored.
    first = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
    wait_until(lambda: first.encoder_spec is not None)
    assert first.encoder_spec.gsd_m != 2.0
    first.raster_combo.setLayer(ships_clip)
    first.gsd_spin.setValue(2.0)
    first.overlap_spin.setValue(0)
    # Choosing the index folder stores the dock's settings in the project.
    first.index_folder.setFilePath(str(tmp_path / "index"))
    project_path = tmp_path / "ships.qgz"
    assert QgsProject.instance().write(str(project_path))
    first.cleanup()
    first.deleteLater()
    QgsApplication.processEvents()

    if panel_open_before_project:
        QgsProject.instance().clear()
        panel = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
        assert QgsProject.instance().read(str(project_path))
    else:
        QgsProject.instance().clear()
        assert QgsProject.instance().read(str(project_path))
        panel = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
    try:
        wait_until(lambda: panel.encoder_spec is not None)
        wait_for_tasks(panel)

        assert panel.gsd_spin.value() == 2.0
        assert panel.overlap_spin.value() == 0
    finally:
        panel.cleanup()
        panel.deleteLater()
        QgsApplication.processEvents()


def test_encoder_choice_after_restore_sets_its_gsd(qgis_iface, qgis_new_project, ships_clip, tmp_path, repo_root):
    first = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
    wait_until(lambda: first.encoder_spec is not None)
    bundled_path = first.encoder_path()
    bundled_gsd_m = first.encoder_spec.gsd_m
    first.raster_combo.setLayer(ships_clip)
    first.gsd_spin.setValue(2.0)
    first.index_folder.setFilePath(str(tmp_path / "index"))
    first.cleanup()
    first.deleteLater()
    QgsApplication.processEvents()
    panel = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
    try:
        wait_until(lambda: panel.encoder_spec is not None)
        assert panel.gsd_spin.value() == 2.0

        # The analyst picks another encoder and then the bundled one again, whose suggested GSD then applies.
        panel.encoder_combo.setCurrentIndex(panel.encoder_combo.findData(OTHER_ENCODER))
        panel.encoder_file.setFilePath(str(repo_root / TINY_ENCODER))
        wait_until(lambda: panel.encoder_spec is not None and panel.encoder_spec.name == "tiny_test_encoder")
        panel.encoder_combo.setCurrentIndex(panel.encoder_combo.findData(bundled_path))
        wait_until(lambda: panel.encoder_spec is not None and panel.encoder_spec.gsd_m == bundled_gsd_m)

        # Its 112 m tile would span 22.4 pixels of the 5 m clip, so the tile widens to 32 pixels.
        assert bundled_gsd_m * 224 / 5.0 < 32
        assert panel.gsd_spin.value() == pytest.approx(round(32 * 5.0 / 224, 3))
    finally:
        wait_for_tasks(panel)
        panel.cleanup()
        panel.deleteLater()
        QgsApplication.processEvents()


# -- GSD limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gsd_m", "reason"),
    [(0.001, "raster pixels, and a tile needs at least 8"), (100000.0, "fewer than 2 encoder pixels")],
)
def test_gsd_outside_range_names_dock_range(dock, ships_clip, tmp_path, qgis_iface, gsd_m, reason):
    dock.raster_combo.setLayer(ships_clip)
    folder = tmp_path / "index"
    dock.index_folder.setFilePath(str(folder))
    dock.overlap_spin.setValue(50)
    dock.gsd_spin.setValue(gsd_m)

    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)

    assert dock.build_task is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert len(warnings) == 1
    assert f"GSD {gsd_m:g} m/px" in warnings[0]
    assert reason in warnings[0]
    # 8 raster pixels of 5 m over 32 encoder pixels, and the clip's 1660 m side over 2 encoder pixels.
    assert "Set the GSD between 1.25 and 830 m/px" in warnings[0]
    for engine_name in ("tile_ground_size_m", "tile_size_source_px", "overlap_fraction"):
        assert engine_name not in warnings[0]
    assert not folder.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_gsd_range_bounds_build(dock, ships_clip, tmp_path, qgis_iface):
    dock.raster_combo.setLayer(ships_clip)

    build_at(dock, tmp_path / "coarsest", gsd_m=830.0, overlap_percent=50)

    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert dock.index is not None
    assert dock.index.count == 1


def test_dense_overlap_names_gsd_and_overlap(dock, ships_clip, tmp_path, qgis_iface):
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.overlap_spin.setValue(75)
    dock.gsd_spin.setValue(2.0)

    assert dock.start_build() is None

    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert len(warnings) == 1
    assert "75 % overlap" in warnings[0]
    assert "or lower the overlap" in warnings[0]
    assert "overlap_fraction" not in warnings[0]
    lowest = float(warnings[0].split("Set the GSD between ")[1].split(" and ")[0])
    assert lowest > 2.0
    dock.gsd_spin.setValue(lowest)
    assert dock.prepare_build().gsd == lowest


# -- folders that are not an index ------------------------------------------------------------------


def test_foreign_manifest_is_not_an_index(dock, ships_clip, tmp_path, qgis_iface, questions):
    folder = tmp_path / "webapp"
    folder.mkdir()
    manifest_text = '{"name": "my web app", "icons": []}'
    (folder / "manifest.json").write_text(manifest_text)
    bar = qgis_iface.messageBar()
    bar.clearWidgets()
    dock.raster_combo.setLayer(ships_clip)

    dock.index_folder.setFilePath(str(folder))
    wait_for_tasks(dock)

    assert dock.index is None
    assert not any("build the index again" in item.text() for item in bar.items())
    warnings = bar.get_messages(Qgis.MessageLevel.Warning)
    assert len(warnings) == 1
    assert f"{folder} is not a Lookalike index" in warnings[0]
    assert "Choose an empty or new folder" in warnings[0]

    bar.clear_messages()
    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert questions == []
    assert dock.build_task is None
    warnings = bar.get_messages(Qgis.MessageLevel.Warning)
    assert len(warnings) == 1
    assert "is not a Lookalike index" in warnings[0]
    assert (folder / "manifest.json").read_text() == manifest_text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["webapp"]


def test_folder_of_other_files_is_refused(dock, ships_clip, tmp_path, qgis_iface, questions):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("draft")
    dock.raster_combo.setLayer(ships_clip)
    dock.index_folder.setFilePath(str(folder))

    assert dock.start_build() is None

    assert questions == []
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert len(warnings) == 1
    assert f"{folder} contains other files and no Lookalike index" in warnings[0]
    assert sorted(path.name for path in folder.iterdir()) == ["thesis.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["documents"]


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:2227"])
def test_layer_sizes_in_ground_metres(repo_root, tmp_path, crs):
    from osgeo import gdal

    from lookalike.ui.build_panel import default_gsd_m, raster_size_m

    clip = str(repo_root / SHIPS_CLIP)
    path = str(tmp_path / "copy.tif")
    if crs == "EPSG:3857":
        gdal.Warp(path, clip, dstSRS=crs)
    else:
        # The clip's 5 m pixels as 16.4042 US survey feet, placed in California.
        dataset = gdal.Open(clip)
        left, top = 6_000_000.0, 2_100_000.0
        bounds = [left, top, left + dataset.RasterXSize * 16.4042, top - dataset.RasterYSize * 16.4042]
        gdal.Translate(path, dataset, outputSRS=crs, outputBounds=bounds)
    original = QgsRasterLayer(clip, "utm")
    copy = QgsRasterLayer(path, "copy")

    assert default_gsd_m(copy, None) == pytest.approx(default_gsd_m(original, None), rel=0.01)
    for copy_m, original_m in zip(raster_size_m(copy), raster_size_m(original)):
        assert copy_m == pytest.approx(original_m, rel=0.02)


def test_append_keeps_finer_index_gsd(dock, ships_clip, repo_root, tmp_path):
    folder = tmp_path / "index"
    # 30 px tiles of 5 m at the tiny encoder's 32 px give a GSD of 4.6875 m, which the field rounds.
    build_index(BuildParameters(
        source_paths=(str(repo_root / SHIPS_CLIP),), index_folder=str(folder),
        encoder_path=str(repo_root / TINY_ENCODER), tile_size_source_px=30, overlap_fraction=0.5,
    ))
    corner = tmp_path / "corner.tif"
    gdal.Translate(str(corner), str(repo_root / SHIPS_CLIP), srcWin=[0, 0, 200, 200])
    corner_layer = QgsRasterLayer(str(corner), "corner")
    QgsProject.instance().addMapLayer(corner_layer)
    dock.index_folder.setFilePath(str(folder))
    wait_for_tasks(dock)
    dock.raster_combo.setLayer(corner_layer)
    dock.add_to_index_check.setChecked(True)
    dock.overlap_spin.setValue(50)
    dock.gsd_spin.setValue(4.6875)

    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    sources = TileIndex.open(folder).sources
    assert len(sources) == 2
    assert sources[1]["grid"]["gsd"] == sources[0]["grid"]["gsd"]


def test_append_built_again_adds_nothing_and_says_so(dock, ships_clip, repo_root, tmp_path, qgis_iface):
    folder = tmp_path / "index"
    dock.raster_combo.setLayer(ships_clip)
    build_at(dock, folder, gsd_m=20.0)
    corner = tmp_path / "corner.tif"
    gdal.Translate(str(corner), str(repo_root / SHIPS_CLIP), srcWin=[0, 0, 200, 200])
    corner_layer = QgsRasterLayer(str(corner), "corner")
    QgsProject.instance().addMapLayer(corner_layer)
    dock.raster_combo.setLayer(corner_layer)
    dock.add_to_index_check.setChecked(True)
    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)
    count = TileIndex.open(folder).count
    successes = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success)
    assert any("Added to the index" in text and f"the index now holds {count} tiles" in text for text in successes)
    qgis_iface.messageBar().clear_messages()

    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert TileIndex.open(folder).count == count
    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success)
    infos = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info)
    assert any("already contains this build" in text and "nothing was embedded or added" in text for text in infos)


def test_settings_changed_after_open_are_saved(dock, ships_clip, tmp_path):
    dock.raster_combo.setLayer(ships_clip)
    build_at(dock, tmp_path / "index", gsd_m=20.0, overlap_percent=50)
    dock.gsd_spin.setValue(7.5)
    dock.overlap_spin.setValue(0)
    dock.k_spin.setValue(50)
    project_path = tmp_path / "ships.qgz"
    assert QgsProject.instance().write(str(project_path))

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))
    wait_for_tasks(dock)

    assert dock.gsd_spin.value() == 7.5
    assert dock.overlap_spin.value() == 0
    assert dock.k_spin.value() == 50


def test_gsd_bounds_keep_field_decimals():
    from lookalike.ui.build_panel import _format_gsd

    assert _format_gsd(16965.062) == "16965.062"
    assert _format_gsd(830.0) == "830"
    assert _format_gsd(1.25) == "1.25"


@pytest.fixture()
def bundled_dock(qgis_iface, qgis_new_project):
    """A panel with the bundled encoder, loaded."""
    panel = LookalikeDockWidget(qgis_iface, qgis_iface.mainWindow())
    wait_until(lambda: panel.encoder_spec is not None)
    yield panel
    wait_for_tasks(panel)
    panel.cleanup()
    panel.deleteLater()
    QgsApplication.processEvents()


def test_default_gsd_widens_tiles_on_coarse_imagery(bundled_dock, shared_data, ships_clip, qgis_canvas):
    half_metre = QgsRasterLayer(str(shared_data / "geo/solaris/sample_geotiff.tif"), "half metre")
    show_layer(qgis_canvas, half_metre)
    spec = bundled_dock.encoder_spec

    bundled_dock.raster_combo.setLayer(half_metre)
    # On 0.5 m imagery the encoder's suggested tile spans 224 raster pixels, so its GSD is kept.
    assert bundled_dock.gsd_spin.value() == pytest.approx(spec.gsd_m)
    assert bundled_dock.tile_size_label.text().endswith(", 224 raster px")

    bundled_dock.raster_combo.setLayer(ships_clip)
    # On the 5 m clip it would span 22.4 pixels; the engine widens a suggested tile to 32 pixels.
    assert bundled_dock.gsd_spin.value() == pytest.approx(round(32 * 5.0 / 224, 3))
    assert bundled_dock.tile_size_label.text().endswith(", 32 raster px")


def test_typed_gsd_stays_when_raster_changes(bundled_dock, shared_data, ships_clip, qgis_canvas):
    bundled_dock.raster_combo.setLayer(ships_clip)
    bundled_dock.gsd_spin.setValue(2.5)
    naip = QgsRasterLayer(str(shared_data / "geo/naip_timeseries/m_4709963_se_14_1_20090818.tif"), "naip 2009")
    show_layer(qgis_canvas, naip)

    bundled_dock.raster_combo.setLayer(naip)

    assert bundled_dock.gsd_spin.value() == 2.5


def test_bundled_encoder_survives_a_project_move(qgis_new_project, tmp_path):
    from lookalike.core.encoder import default_model_path
    from lookalike.ui import project_state

    project = QgsProject.instance()
    (tmp_path / "a").mkdir()
    assert project.write(str(tmp_path / "a" / "survey.qgz"))
    project_state.write_state(project_state.DockState(encoder_path=str(default_model_path())), project)

    # Stored by name, not as a path relative to the project file.
    stored, _found = project.readEntry(project_state.SCOPE, "/encoder_path", "")
    assert stored == f"bundled:{default_model_path().name}"
    (tmp_path / "deeper" / "still").mkdir(parents=True)
    assert project.write(str(tmp_path / "deeper" / "still" / "survey.qgz"))
    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(tmp_path / "deeper" / "still" / "survey.qgz"))
    assert project_state.read_state(QgsProject.instance()).encoder_path == str(default_model_path())


def test_encoder_outside_moved_project_still_found(qgis_new_project, tmp_path):
    from lookalike.ui import project_state

    encoder = tmp_path / "models" / "custom.onnx"
    encoder.parent.mkdir()
    encoder.write_bytes(b"stands in for a model")
    project_folder = tmp_path / "survey"
    project_folder.mkdir()
    project = QgsProject.instance()
    assert project.write(str(project_folder / "survey.qgz"))
    project_state.write_state(project_state.DockState(encoder_path=str(encoder)), project)
    assert project.write(str(project_folder / "survey.qgz"))
    # The project folder moves one level deeper; the encoder stays where it was.
    moved = tmp_path / "archive" / "survey"
    moved.parent.mkdir()
    project_folder.rename(moved)
    QgsProject.instance().clear()

    assert QgsProject.instance().read(str(moved / "survey.qgz"))
    fallbacks = []

    assert project_state.read_state(QgsProject.instance(), fallbacks).encoder_path == str(encoder)
    assert [absolute for _relative, absolute in fallbacks] == [str(encoder)]


def test_unusable_encoder_named_at_build(dock, ships_clip, tmp_path, qgis_iface):
    not_a_model = tmp_path / "notes.onnx"
    not_a_model.write_text("not an ONNX model", encoding="utf-8")
    dock.raster_combo.setLayer(ships_clip)
    dock.encoder_file.setFilePath(str(not_a_model))
    wait_for_tasks(dock)
    qgis_iface.messageBar().clear_messages()

    dock.index_folder.setFilePath(str(tmp_path / "index"))
    QTest.mouseClick(dock.build_button, Qt.MouseButton.LeftButton)

    assert dock.build_task is None
    errors = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical) + \
        qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("The encoder cannot be used:" in text for text in errors), errors
    assert not any("still loading" in text for text in errors), errors
