"""How failures reach the analyst: task logs without tracebacks for input errors, and chip
exports whose first error is the one reported."""

import logging

import pytest
from osgeo import gdal

from lookalike.core.errors import LookalikeError, RasterError
from lookalike.gis import chip_export
from lookalike.gis.tasks import LookalikeTask, TaskOutcome


def run_task(work) -> LookalikeTask:
    task = LookalikeTask("Lookalike: test job", work)
    task.run()
    return task


def failing(error: BaseException):
    def work(_task):
        raise error

    return work


def test_input_error_is_logged_without_traceback(caplog):
    with caplog.at_level(logging.DEBUG, logger="lookalike"):
        task = run_task(failing(LookalikeError("index folder /data/x is a file; choose a folder path")))

    assert task.outcome is TaskOutcome.FAILED
    logged = [record for record in caplog.records if record.levelno >= logging.INFO]
    assert [record.levelno for record in logged] == [logging.WARNING]
    assert "Traceback" not in logged[0].getMessage()
    assert "choose a folder path" in logged[0].getMessage()


def test_unexpected_error_keeps_traceback(caplog):
    with caplog.at_level(logging.INFO, logger="lookalike"):
        task = run_task(failing(ZeroDivisionError("division by zero")))

    assert task.outcome is TaskOutcome.FAILED
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "Traceback" in errors[0].getMessage()


def ships_request(repo_root) -> chip_export.ChipRequest:
    path = str(repo_root / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif")
    dataset = gdal.Open(path)
    x0, pixel_width, _, y0, _, pixel_height = dataset.GetGeoTransform()
    bounds = (x0, y0 + 64 * pixel_height, x0 + 64 * pixel_width, y0)
    return chip_export.ChipRequest(
        feature_id=1, bounds=bounds, crs_wkt=dataset.GetProjection(), crs_authid="EPSG:32610",
        source_path=path, label="",
    )


def test_chip_error_not_hidden(repo_root, tmp_path, monkeypatch):
    def chip_fails(*_args, **_kwargs):
        raise RasterError("Writing the chip failed (disk full); check that the folder is writable.")

    def csv_fails(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(chip_export, "_write_chip", chip_fails)
    monkeypatch.setattr(chip_export, "_write_csv", csv_fails)

    with pytest.raises(RasterError, match="Writing the chip failed"):
        chip_export.export_chips([ships_request(repo_root)], tmp_path / "chips")


def test_csv_error_names_the_file(repo_root, tmp_path, monkeypatch):
    def csv_fails(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(chip_export, "_write_csv", csv_fails)

    with pytest.raises(LookalikeError, match=r"Writing .*labels.csv failed \(Permission denied\)"):
        chip_export.export_chips([ships_request(repo_root)], tmp_path / "chips")


def test_failed_export_keeps_existing_labels(repo_root, tmp_path):
    folder = tmp_path / "chips"
    chip_export.export_chips([ships_request(repo_root)], folder)
    labels = folder / chip_export.LABELS_CSV_NAME
    labels.write_text(labels.read_text() + "edited by the analyst\n")
    before = labels.read_text()

    with pytest.raises(LookalikeError, match="band"):
        chip_export.export_chips([ships_request(repo_root)], folder, band_indexes=(3, 2, 5))

    assert labels.read_text() == before
