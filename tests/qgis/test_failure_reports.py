"""How failures reach the analyst: task logs without tracebacks for input errors, and chip
exports whose first error is the one reported."""

import csv
import json
import logging
from dataclasses import replace

import pytest
from osgeo import gdal

from lookalike.core.errors import CancelledError, LookalikeError, RasterError
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


def ships_requests(repo_root, count: int) -> list:
    """``count`` chip requests along the top of the ships clip, 64 px apart."""
    first = ships_request(repo_root)
    xmin, ymin, xmax, ymax = first.bounds
    width = xmax - xmin
    return [replace(first, feature_id=number + 1, bounds=(xmin + number * width, ymin, xmax + number * width, ymax))
            for number in range(count)]


def csv_chip_names(folder) -> list:
    with open(folder / chip_export.LABELS_CSV_NAME, newline="", encoding="utf-8") as stream:
        return sorted(row["chip"] for row in csv.DictReader(stream))


def cancel_after(chip_count: int):
    """Return an ``is_cancelled`` check that stops an export after ``chip_count`` chips."""
    polls = []

    def is_cancelled() -> bool:
        polls.append(1)
        return len(polls) > chip_count

    return is_cancelled


def folder_files(folder) -> dict:
    """Return the content of every file in ``folder`` and below, by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_cancelled_reexport_keeps_earlier_chips(repo_root, tmp_path):
    folder = tmp_path / "chips"
    chip_export.export_chips(ships_requests(repo_root, 5), folder)
    before = folder_files(folder)

    with pytest.raises(CancelledError, match="left as it was"):
        chip_export.export_chips(ships_requests(repo_root, 3)[::-1], folder, is_cancelled=cancel_after(2))

    assert folder_files(folder) == before


def test_cancelled_reordered_reexport_keeps_notes(repo_root, tmp_path):
    folder = tmp_path / "chips"
    first, second = ships_requests(repo_root, 2)
    labels = export_with_notes([first, second], folder)
    before = folder_files(folder)

    # The first chip of this run shows the footprint that chip_00002 shows now.
    with pytest.raises(CancelledError):
        chip_export.export_chips([second, first], folder, is_cancelled=cancel_after(1))

    assert folder_files(folder) == before
    assert csv_notes(labels)["chip_00001.tif"] == "checked chip_00001.tif by hand"


def test_cancelled_first_export_leaves_no_files(repo_root, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()

    with pytest.raises(CancelledError):
        chip_export.export_chips(ships_requests(repo_root, 3), folder, is_cancelled=cancel_after(2))

    assert list(folder.iterdir()) == []


def test_failed_export_leaves_earlier_export(repo_root, tmp_path, monkeypatch):
    folder = tmp_path / "chips"
    chip_export.export_chips(ships_requests(repo_root, 3), folder)
    before = folder_files(folder)
    write_chip = chip_export._write_chip
    written = []

    def fail_on_third_chip(*args, **kwargs):
        written.append(1)
        if len(written) == 3:
            raise RasterError("disk full")
        return write_chip(*args, **kwargs)

    monkeypatch.setattr(chip_export, "_write_chip", fail_on_third_chip)
    with pytest.raises(RasterError, match="disk full"):
        chip_export.export_chips(ships_requests(repo_root, 3)[::-1], folder)

    assert folder_files(folder) == before


def read_labels(labels) -> list:
    """Return the rows of ``labels`` as dictionaries."""
    with open(labels, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def write_labels(labels, rows, columns=None, delimiter=",", encoding="utf-8") -> None:
    """Write ``rows`` to ``labels`` (only ``columns`` when given), as a spreadsheet saves them."""
    with open(labels, "w", newline="", encoding=encoding) as stream:
        writer = csv.DictWriter(stream, fieldnames=columns or [*rows[0]], delimiter=delimiter, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def add_notes_column(labels) -> None:
    """Add a column of notes to ``labels``, as an analyst would in a spreadsheet."""
    rows = read_labels(labels)
    for row in rows:
        row["notes"] = f"checked {row['chip']} by hand"
    write_labels(labels, rows)


def csv_notes(labels) -> dict:
    """Return the notes column of ``labels`` by chip name; empty where a row has none."""
    with open(labels, newline="", encoding="utf-8") as stream:
        return {row["chip"]: row.get("notes", "") for row in csv.DictReader(stream)}


def export_with_notes(requests, folder):
    """Export ``requests`` into ``folder``, add a notes column to its labels.csv and return that file."""
    chip_export.export_chips(requests, folder)
    labels = folder / chip_export.LABELS_CSV_NAME
    add_notes_column(labels)
    return labels


def test_cancelled_reexport_keeps_analyst_columns(repo_root, tmp_path):
    folder = tmp_path / "chips"
    labels = export_with_notes(ships_requests(repo_root, 3), folder)

    with pytest.raises(CancelledError):
        chip_export.export_chips(ships_requests(repo_root, 3), folder, is_cancelled=cancel_after(1))

    notes = csv_notes(labels)
    # The chip written again shows the same footprint, so its note stays, as do the rows of the
    # two the export did not reach.
    assert notes == {"chip_00001.tif": "checked chip_00001.tif by hand",
                     "chip_00002.tif": "checked chip_00002.tif by hand",
                     "chip_00003.tif": "checked chip_00003.tif by hand"}


def test_reexport_notes_follow_footprints(repo_root, tmp_path):
    folder = tmp_path / "chips"
    first, second, third, new = ships_requests(repo_root, 4)
    labels = export_with_notes([first, second, third], folder)
    rows = read_labels(labels)
    rows[1]["notes"] = ""
    write_labels(labels, rows)

    # Only two of the earlier matches are exported again, under other chip numbers, with a new one.
    chip_export.export_chips([third, first, new], folder)

    assert csv_notes(labels) == {"chip_00001.tif": "checked chip_00003.tif by hand",
                     "chip_00002.tif": "checked chip_00001.tif by hand",
                     "chip_00003.tif": ""}


def test_reexport_keeps_notes_of_left_out_chips(repo_root, tmp_path):
    folder = tmp_path / "chips"
    first, second, third = ships_requests(repo_root, 3)
    export_with_notes([first, second, third], folder)
    before = folder_files(folder)

    with pytest.raises(LookalikeError, match="has notes in columns you added for chip_00002.tif") as raised:
        chip_export.export_chips([third, first], folder)

    assert "Export into another folder" in str(raised.value)
    assert folder_files(folder) == before


def test_export_into_checkpoint_name_stops(repo_root, tmp_path):
    (tmp_path / "harbour_index").mkdir()

    for folder in (tmp_path / "harbour_index.partial", tmp_path / "harbour_index.partial" / "chips"):
        with pytest.raises(LookalikeError, match="checkpoint folder of builds into"):
            chip_export.export_chips(ships_requests(repo_root, 1), folder)

    assert not (tmp_path / "harbour_index.partial").exists()


def test_export_into_checkpoints_of_interrupted_first_build_stops(repo_root, tmp_path):
    checkpoints = tmp_path / "harbour_index.partial"
    checkpoints.mkdir()
    (checkpoints / "partial_build.json").write_text(json.dumps(
        {"format": "lookalike-partial-build", "format_version": 1, "build_id": "an interrupted build"}))

    with pytest.raises(LookalikeError, match="is the checkpoint folder of an interrupted Lookalike build"):
        chip_export.export_chips(ships_requests(repo_root, 1), checkpoints)

    assert sorted(path.name for path in checkpoints.iterdir()) == ["partial_build.json"]


def test_labels_with_nul_bytes_stop_export(repo_root, tmp_path):
    # UTF-16 saved without a byte order mark decodes as text with NUL bytes between the letters.
    folder = tmp_path / "chips"
    folder.mkdir()
    labels = folder / chip_export.LABELS_CSV_NAME
    content = "chip\tlabel\r\nchip_00001.tif\twheat\r\n".encode("utf-16-le")
    labels.write_bytes(content)

    with pytest.raises(LookalikeError, match="NUL bytes") as raised:
        chip_export.export_chips(ships_requests(repo_root, 1), folder)

    assert "save it as CSV UTF-8" in str(raised.value)
    assert labels.read_bytes() == content
    assert not list(folder.glob("chip_*"))


def test_export_without_chips_keeps_earlier(repo_root, tmp_path):
    folder = tmp_path / "chips"
    chip_export.export_chips(ships_requests(repo_root, 2), folder)
    before = (folder / chip_export.LABELS_CSV_NAME).read_text()
    off_raster = replace(ships_request(repo_root), bounds=(100.0, 100.0, 200.0, 200.0))

    with pytest.raises(LookalikeError, match="No chip was written: none of the 1 footprints .* are kept"):
        chip_export.export_chips([off_raster], folder)

    assert (folder / chip_export.LABELS_CSV_NAME).read_text() == before
    assert len(list(folder.glob("chip_*.tif"))) == 2


def test_export_without_chips_fails_in_new_folder(repo_root, tmp_path):
    folder = tmp_path / "chips"
    off_raster = replace(ships_request(repo_root), bounds=(100.0, 100.0, 200.0, 200.0))

    with pytest.raises(LookalikeError, match="No chip was written: none of the 1 footprints") as raised:
        chip_export.export_chips([off_raster], folder)

    assert off_raster.source_path in str(raised.value)
    assert not (folder / chip_export.LABELS_CSV_NAME).exists()
    assert not list(folder.glob("chip_*"))


def test_failed_export_leaves_no_new_folder(repo_root, tmp_path):
    folder = tmp_path / "new" / "chips"

    with pytest.raises(LookalikeError, match="band index 5 is out of range"):
        chip_export.export_chips([ships_request(repo_root)], folder, band_indexes=(5, 6, 7))

    assert not (tmp_path / "new").exists()


def test_failed_export_keeps_existing_empty_folder(repo_root, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()

    with pytest.raises(LookalikeError, match="band index 5 is out of range"):
        chip_export.export_chips([ships_request(repo_root)], folder, band_indexes=(5, 6, 7))

    assert folder.is_dir()


def test_export_names_moved_raster(repo_root, tmp_path):
    moved = replace(ships_request(repo_root), source_path=str(tmp_path / "ships_moved_away.tif"))

    with pytest.raises(LookalikeError) as raised:
        chip_export.export_chips([moved], tmp_path / "chips")

    message = str(raised.value)
    assert f"The raster {tmp_path / 'ships_moved_away.tif'} of feature {moved.feature_id} is not found" in message
    assert "Put it back at that path" in message


def test_export_replaces_links_not_targets(repo_root, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()
    users_table = tmp_path / "users_table.csv"
    users_table.write_text("my own table\n", encoding="utf-8")
    (folder / chip_export.LABELS_CSV_NAME).symlink_to(users_table)

    chip_export.export_chips(ships_requests(repo_root, 1), folder)

    assert users_table.read_text(encoding="utf-8") == "my own table\n"
    assert csv_chip_names(folder) == ["chip_00001.tif"]


@pytest.mark.parametrize("resave", ["byte order mark", "semicolons", "windows code page", "mac line ends", "utf-16",
                                    "tabs", "excel separator line", "excel tab separator line",
                                    "quoted separator line"])
def test_spreadsheet_saved_labels_still_cleaned(repo_root, tmp_path, resave):
    # The analyst fixed labels in a spreadsheet, which saved labels.csv its own way.
    folder = tmp_path / "chips"
    chip_export.export_chips(ships_requests(repo_root, 4), folder)
    labels = folder / chip_export.LABELS_CSV_NAME
    text = labels.read_text(encoding="utf-8").replace(",,", ",Baumschule ä,", 1)
    if resave == "byte order mark":
        labels.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    elif resave == "semicolons":
        labels.write_text(text.replace(",", ";"), encoding="utf-8")
    elif resave == "windows code page":
        labels.write_bytes(text.encode("cp1252"))
    elif resave == "utf-16":
        labels.write_bytes(text.encode("utf-16"))
    elif resave == "tabs":
        labels.write_text(text.replace(",", "\t"), encoding="utf-8")
    elif resave == "excel separator line":
        labels.write_text("sep=;\r\n" + text.replace(",", ";"), encoding="utf-8")
    elif resave == "excel tab separator line":
        labels.write_text("sep=\t\r\n" + text.replace(",", "\t"), encoding="utf-8")
    elif resave == "quoted separator line":
        labels.write_text('"sep=;"\r\n' + text.replace(",", ";"), encoding="utf-8")
    else:
        labels.write_bytes(text.replace("\r\n", "\r").replace("\n", "\r").encode("cp1252"))

    chip_export.export_chips(ships_requests(repo_root, 2), folder)

    names = ["chip_00001.tif", "chip_00002.tif"]
    assert sorted(path.name for path in folder.glob("chip_*.tif")) == names
    assert csv_chip_names(folder) == names


def test_notes_survive_decimal_comma_spreadsheet(repo_root, tmp_path):
    # A spreadsheet in a decimal-comma locale saves with semicolons and writes 558810,5 for 558810.5.
    folder = tmp_path / "chips"
    requests = ships_requests(repo_root, 2)
    labels = export_with_notes(requests, folder)
    rows = read_labels(labels)
    for row in rows:
        for name in ("xmin", "ymin", "xmax", "ymax"):
            row[name] = f"{float(row[name]):.3f}".replace(".", ",")
    write_labels(labels, rows, delimiter=";", encoding="utf-8-sig")

    chip_export.export_chips(requests[::-1], folder)

    assert csv_notes(labels) == {"chip_00001.tif": "checked chip_00002.tif by hand",
                                 "chip_00002.tif": "checked chip_00001.tif by hand"}


def test_typed_label_stays_unmarked(repo_root, tmp_path):
    folder = tmp_path / "chips"
    requests = [replace(request, label="") for request in ships_requests(repo_root, 2)]
    chip_export.export_chips(requests, folder)
    labels = folder / chip_export.LABELS_CSV_NAME
    rows = read_labels(labels)
    rows[1]["label"] = "ship"
    write_labels(labels, rows)

    # The second match is now unmarked again; the first gets a label from its mark.
    chip_export.export_chips([replace(requests[0], label="not relevant"), requests[1]], folder)

    assert {row["chip"]: row["label"] for row in read_labels(labels)} == {
        "chip_00001.tif": "not relevant", "chip_00002.tif": "ship"}


def test_labels_without_chip_column_stop_export(repo_root, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()
    labels = folder / chip_export.LABELS_CSV_NAME
    labels.write_text("name,label\nfield_1,wheat\n", encoding="utf-8")

    with pytest.raises(LookalikeError, match="has no 'chip' column"):
        chip_export.export_chips(ships_requests(repo_root, 1), folder)

    assert labels.read_text(encoding="utf-8") == "name,label\nfield_1,wheat\n"
    assert not list(folder.glob("chip_*"))


def test_labels_of_another_tool_stop_export(repo_root, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()
    labels = folder / chip_export.LABELS_CSV_NAME
    labels.write_text("chip,label\ndata.tif,forest\nchip_00009.tif,water\n", encoding="utf-8")
    own_chip = folder / "chip_00009.tif"
    own_chip.write_bytes(b"the analyst's image")

    with pytest.raises(LookalikeError, match="was not written by a Lookalike chip export"):
        chip_export.export_chips(ships_requests(repo_root, 2), folder)

    assert labels.read_text(encoding="utf-8") == "chip,label\ndata.tif,forest\nchip_00009.tif,water\n"
    assert own_chip.read_bytes() == b"the analyst's image"
    assert sorted(path.name for path in folder.iterdir()) == ["chip_00009.tif", "labels.csv"]


def test_unlisted_chip_file_stops_export(repo_root, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()
    own_chip = folder / "chip_00002.tif"
    own_chip.write_bytes(b"the analyst's image")

    with pytest.raises(LookalikeError, match="already contains chip_00002.tif, which no labels.csv"):
        chip_export.export_chips(ships_requests(repo_root, 3), folder)

    assert own_chip.read_bytes() == b"the analyst's image"
    assert sorted(path.name for path in folder.iterdir()) == ["chip_00002.tif"]


def test_reexport_replaces_its_own_chips(repo_root, tmp_path):
    folder = tmp_path / "chips"
    chip_export.export_chips(ships_requests(repo_root, 3), folder)

    chip_export.export_chips(ships_requests(repo_root, 2), folder)

    assert csv_chip_names(folder) == ["chip_00001.tif", "chip_00002.tif"]
    assert sorted(path.name for path in folder.glob("chip_*")) == ["chip_00001.tif", "chip_00002.tif"]


def test_chip_folder_that_is_a_file_named(repo_root, tmp_path):
    existing = tmp_path / "chips"
    existing.write_text("an analyst's notes")

    with pytest.raises(LookalikeError, match=f"The chip folder {existing} is a file; choose a folder path"):
        chip_export.export_chips(ships_requests(repo_root, 1), existing)

    assert existing.read_text() == "an analyst's notes"


def test_point_features_named_as_without_footprint(repo_root):
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY, QgsVectorLayer

    raster = str(repo_root / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif")
    layer = QgsVectorLayer("Point?crs=EPSG:32610", "ship points", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(558585.0, 4176120.0)))
    layer.dataProvider().addFeatures([feature])

    with pytest.raises(LookalikeError, match="of layer 'ship points' covers no area .* buffer the features first"):
        chip_export.chip_requests_from_layer(layer, raster_path=raster)


def test_notes_kept_per_date(repo_root, tmp_path):
    first_date = ships_request(repo_root)
    second_raster = tmp_path / "second_date.tif"
    gdal.Translate(str(second_raster), first_date.source_path)
    second_date = replace(first_date, feature_id=2, source_path=str(second_raster),
                          attributes={"source": str(second_raster)})
    first_date = replace(first_date, attributes={"source": first_date.source_path})
    labels = export_with_notes([first_date, second_date], tmp_path / "chips")

    chip_export.export_chips([second_date, first_date], tmp_path / "chips")

    with open(labels, newline="", encoding="utf-8") as stream:
        notes = {row["source"]: row["notes"] for row in csv.DictReader(stream)}
    assert notes == {first_date.source_path: "checked chip_00001.tif by hand",
                     str(second_raster): "checked chip_00002.tif by hand"}


def test_chips_from_another_raster_keep_their_own_notes(repo_root, tmp_path):
    # One match exported twice, once from its own raster and once from another date of the place.
    match = ships_request(repo_root)
    match = replace(match, attributes={"source": match.source_path})
    other_raster = tmp_path / "other_date.tif"
    gdal.Translate(str(other_raster), match.source_path)
    from_other_date = replace(match, feature_id=2, source_path=str(other_raster))
    labels = export_with_notes([match, from_other_date], tmp_path / "chips")

    chip_export.export_chips([from_other_date, match], tmp_path / "chips")

    rows = {row["chip"]: row for row in read_labels(labels)}
    assert {chip: (row["source"], row["chip_source"], row["notes"]) for chip, row in rows.items()} == {
        "chip_00001.tif": (match.source_path, str(other_raster), "checked chip_00002.tif by hand"),
        "chip_00002.tif": (match.source_path, match.source_path, "checked chip_00001.tif by hand"),
    }


def test_notes_of_labels_without_chip_source_column(repo_root, tmp_path):
    # A labels.csv of an export before the chip_source column keeps its notes.
    first, second = (replace(request, attributes={"source": request.source_path})
                     for request in ships_requests(repo_root, 2))
    labels = export_with_notes([first, second], tmp_path / "chips")
    rows = read_labels(labels)
    write_labels(labels, rows, columns=[name for name in rows[0] if name != "chip_source"])

    chip_export.export_chips([second, first], tmp_path / "chips")

    assert csv_notes(labels) == {"chip_00001.tif": "checked chip_00002.tif by hand",
                                 "chip_00002.tif": "checked chip_00001.tif by hand"}


def test_notes_of_repeated_footprint(repo_root, tmp_path):
    first, other = ships_requests(repo_root, 2)
    folder = tmp_path / "chips"
    labels = export_with_notes([first, first, other], folder)

    chip_export.export_chips([first, first, other], folder)

    assert csv_notes(labels) == {"chip_00001.tif": "checked chip_00001.tif by hand",
                                 "chip_00002.tif": "checked chip_00002.tif by hand",
                                 "chip_00003.tif": "checked chip_00003.tif by hand"}


def test_chip_as_raster_rejected(repo_root, tmp_path):
    folder = tmp_path / "chips"
    chip_export.export_chips(ships_requests(repo_root, 3), folder)
    chip_as_raster = folder / "chip_00002.tif"
    before = chip_as_raster.read_bytes()
    request = replace(ships_request(repo_root), source_path=str(chip_as_raster))

    with pytest.raises(LookalikeError, match="is a chip in the chip folder"):
        chip_export.export_chips([request], folder)

    assert chip_as_raster.read_bytes() == before
    assert csv_chip_names(folder) == ["chip_00001.tif", "chip_00002.tif", "chip_00003.tif"]
