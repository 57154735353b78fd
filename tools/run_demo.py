"""Headless demo: index the shipped RapidEye clip, search with a box around one ship, write results.

    .venv/bin/python tools/run_demo.py [--output-folder output] [--encoder MODEL.onnx] [--k 5] [--overwrite]

Writes ``matches.gpkg`` (the ranked match footprints), ``matches.png`` (the clip with the query
box and the matches) and the index ``demo_index/`` into the output folder, and records their
SHA-256 checksums in ``demo_outputs.json``. The demo replaces only its own earlier outputs,
which it recognises by those checksums, and a record file that it wrote itself. Anything else at
those paths is left alone unless ``--overwrite`` is given. Even then, ``demo_index`` is replaced
only when it is a Lookalike index or empty, and a file path only when it is a file. A record
written by demos before the index was recorded lists only the two files. Its ``demo_index`` is
accepted, and added to the record, when the sample clip is the index's only source.

Starts its own offscreen QgsApplication, so no display is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devimport import REPO_ROOT, import_lookalike

import_lookalike()

from lookalike.core.encoder import default_model_path, file_sha256, load_encoder  # noqa: E402
from lookalike.core.errors import LookalikeError  # noqa: E402
from lookalike.core.index import (  # noqa: E402
    FOLDER_EMPTY,
    FOLDER_FOREIGN,
    FOLDER_INDEX,
    MANIFEST_NAME,
    enclosing_index_folder,
    index_folder_state,
    lookalike_folder_kind,
    read_manifest_json,
)
from lookalike.core.pipeline import BuildParameters, BuildReport, Progress, build_index, run_search  # noqa: E402
from lookalike.core.search import Match  # noqa: E402

SAMPLE_RASTER = REPO_ROOT / "sample_data" / "1056417_2017-03-08_RE3_3A_Visual_clip.tif"
SAMPLE_CRS = "EPSG:32610"

# Ships in the clip are 35-45 pixels (175-225 m) long. A 64-pixel tile (320 m at 5 m/px) contains
# a whole ship with water around it, so a box drawn around one ship fits in one query chip
# centred on it. Tiles are upsampled to the encoder's 224 px input. The 0.75 overlap (16 px
# stride) puts some tile within 8 px of every ship's centre. Measured with EfficientNet-Lite0
# (float32) and each ship as the query in turn: the other ships ranked 5th at worst with 0.5
# overlap and 4th at worst with 0.75. The int8 model also gave 4th at worst with 0.75.
DEMO_TILE_SIZE_SOURCE_PX = 64
DEMO_OVERLAP_FRACTION = 0.75
DEMO_K = 5

# Box around the north-west ship in EPSG:32610 metres: its bright pixels span columns 128-141
# and rows 25-68 of the clip (see SHIP_CENTRES_M), widened by 4 pixels (20 m) on every side.
DEMO_QUERY_BOUNDS_M = (557670.0, 4176095.0, 557780.0, 4176355.0)

# Centroids of the four ships in EPSG:32610 metres. Pixels whose mean of R, G and B exceeds 120
# (open water is 40-90) were grouped into connected components, which gave one per ship.
SHIP_CENTRES_M = {
    "north-west": (557726.5, 4176224.6),
    "north-centre": (558591.5, 4176109.1),
    "north-east (red hull)": (559280.1, 4176024.5),
    "south": (558873.3, 4174925.0),
}

MATCHES_FILE_NAME = "matches.gpkg"
MAP_FILE_NAME = "matches.png"
INDEX_FOLDER_NAME = "demo_index"
RECORD_FILE_NAME = "demo_outputs.json"
OUTPUT_FILE_NAMES = (MATCHES_FILE_NAME, MAP_FILE_NAME)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line, and exit with argparse's usage error on an invalid value.

    Every check runs here, before the index is built, so a bad value costs no indexing time.
    ``encoder`` is returned resolved to the default model when ``--encoder`` is not given.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-folder", type=folder_path, default=REPO_ROOT / "output",
                        help="folder for matches.gpkg, matches.png, demo_index/ and demo_outputs.json; "
                             "created when missing (default: output/)")
    parser.add_argument("--encoder", type=Path, default=None,
                        help="ONNX encoder to index with (default: the plugin's default model under models/)")
    parser.add_argument("--k", type=match_count, default=DEMO_K,
                        help=f"number of matches, a whole number of at least 1 (default: {DEMO_K})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace matches.gpkg, matches.png and demo_outputs.json even when the demo did "
                             "not write them; demo_index/ is still replaced only when it is empty or an index")
    arguments = parser.parse_args(argv)

    try:
        if arguments.output_folder.exists() and not arguments.output_folder.is_dir():
            parser.error(f"--output-folder {arguments.output_folder} is not a folder; pass a folder path "
                         "(a missing folder is created)")
        file_above = next((parent for parent in arguments.output_folder.parents if parent.is_file()), None)
    except OSError as error:
        parser.error(f"--output-folder {arguments.output_folder} cannot be used ({error.strerror}); pass "
                     "another folder path")
    if file_above is not None:
        parser.error(f"--output-folder {arguments.output_folder} lies under {file_above}, which is a file; pass "
                     "a folder path")
    enclosing = enclosing_index_folder(arguments.output_folder / INDEX_FOLDER_NAME)
    if enclosing is not None:
        parser.error(f"--output-folder {arguments.output_folder} is inside {lookalike_folder_kind(enclosing)} "
                     f"{enclosing}, whose files the demo's outputs could be mixed with; pass a folder outside it")
    if arguments.encoder is None:
        arguments.encoder = default_model_path()
        if not arguments.encoder.is_file():
            parser.error(f"the default encoder {arguments.encoder} is missing; pass --encoder with an ONNX "
                         "encoder file")
    elif not arguments.encoder.is_file():
        parser.error(f"--encoder {arguments.encoder} not found; pass an ONNX encoder file")
    try:
        load_encoder(arguments.encoder)
    except LookalikeError as error:
        parser.error(f"--encoder {arguments.encoder} cannot be used: {error}")
    missing = [folder for folder in (arguments.output_folder, *arguments.output_folder.parents)
               if not os.path.exists(folder)]
    try:
        arguments.output_folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        # mkdir creates the parents before it fails on a later part, such as a name that is too long.
        for folder in missing:
            if os.path.isdir(folder):
                folder.rmdir()
        parser.error(f"--output-folder {arguments.output_folder} cannot be created ({error.strerror}); pass a "
                     "folder you can write to")
    return arguments


def folder_path(text: str) -> Path:
    """Return ``text`` as a path; argparse turns the error for an empty name into a usage message."""
    if not text.strip():
        # Path("") is the current folder, which would put the outputs wherever the command ran.
        raise argparse.ArgumentTypeError("the folder name is missing; pass a folder path such as output")
    return Path(text)


def match_count(text: str) -> int:
    """Convert the value of ``--k``; argparse turns ArgumentTypeError into a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number; pass the number of matches, at least 1"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; pass the number of matches, at least 1")
    return value


def ship_in_footprint(match: Match) -> Optional[str]:
    """Return the name of the ship whose centroid lies inside the match footprint, if any."""
    xmin, ymin, xmax, ymax = match.bounds
    for name, (x, y) in SHIP_CENTRES_M.items():
        if xmin <= x <= xmax and ymin <= y <= ymax:
            return name
    return None


# -- the record of the demo's own outputs ---------------------------------------------------------
#
# demo_outputs.json maps each output name to the SHA-256 of the file the demo wrote, and
# "demo_index" to a map from each file path inside the index folder to its SHA-256. An output
# whose current checksums equal the recorded ones was written by the demo and may be replaced.


def read_record(record_path: Path, overwrite: bool) -> dict[str, Any]:
    """Return the checksums recorded in ``record_path``, or {} when it is missing.

    Raises SystemExit when the file is not a record that the demo wrote, unless ``overwrite``
    is set, in which case the file is treated as missing and replaced later.
    """
    if not record_path.exists():
        return {}
    if not record_path.is_file():
        raise SystemExit(
            f"{record_path} is not a file, and the demo replaces only a file there, even with --overwrite. "
            "Move it away or pass another --output-folder."
        )
    recorded = parse_record(record_path)
    if recorded is not None:
        return recorded
    if overwrite:
        return {}
    raise SystemExit(
        f"{record_path} exists and is not a record written by the demo. "
        "Move it away or rerun with --overwrite to replace it."
    )


def parse_record(record_path: Path) -> Optional[dict[str, Any]]:
    """Return the record's checksums, or None when the file does not have the demo's record layout.

    The layout is a non-empty JSON object whose keys are output names and whose values are
    SHA-256 hex digests, or for the index a non-empty object of them. A record written before
    the demo recorded its index contains only the two file names, and is accepted too.
    """
    try:
        content = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or not content:
        return None
    for name, value in content.items():
        if name in OUTPUT_FILE_NAMES:
            valid = is_sha256(value)
        elif name == INDEX_FOLDER_NAME:
            valid = (isinstance(value, dict) and bool(value)
                     and all(isinstance(path, str) and is_sha256(digest) for path, digest in value.items()))
        else:
            valid = False
        if not valid:
            return None
    return content


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None


def folder_files(folder: Path) -> dict[str, Path]:
    """Return every file under ``folder``, keyed by its path relative to the folder with ``/``."""
    return {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}


def folder_checksums(folder: Path) -> dict[str, str]:
    return {name: file_sha256(path) for name, path in sorted(folder_files(folder).items())}


def folder_matches_record(folder: Path, recorded: Any) -> bool:
    """Tell whether ``folder`` contains exactly the recorded files with the recorded checksums."""
    if not isinstance(recorded, dict):
        return False
    files = folder_files(folder)
    if set(files) != set(recorded):
        return False
    # Smallest first: another index differs in its small manifest.json, so its large data files
    # are usually not read at all.
    for name, path in sorted(files.items(), key=lambda item: item[1].stat().st_size):
        if file_sha256(path) != recorded[name]:
            return False
    return True


def is_sample_raster(path: Any, checksum: Any) -> bool:
    """Tell whether a manifest's source record names the demo's sample raster, by path or SHA-256."""
    if isinstance(checksum, str) and checksum == file_sha256(SAMPLE_RASTER):
        return True
    if not isinstance(path, str):
        return False
    try:
        return os.path.samefile(path, SAMPLE_RASTER)
    except OSError:
        # The path is missing or unreadable, so only the checksum could have matched.
        return False


def is_earlier_demo_index(index_folder: Path) -> bool:
    """Tell whether ``index_folder`` is an index of the sample raster alone, as earlier demos wrote.

    Demos before the record listed ``demo_index`` wrote such an index and recorded only the two
    files. A user's index of other rasters, or of the sample raster together with others, is not one.
    """
    if index_folder_state(index_folder) != FOLDER_INDEX:
        return False
    manifest = read_manifest_json(index_folder / MANIFEST_NAME)
    sources = manifest.get("sources") if manifest is not None else None
    if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
        return False
    return is_sample_raster(sources[0].get("path"), sources[0].get("checksum"))


def upgrade_earlier_record(recorded: dict[str, Any], record_path: Path, index_folder: Path) -> None:
    """Record the index of a record written before the demo recorded its index, and save the record.

    Only an index that :func:`is_earlier_demo_index` accepts is recorded, and only when the record
    exists and lists no index. Anything else is left to :func:`check_outputs_writable`.
    """
    if not recorded or INDEX_FOLDER_NAME in recorded or not index_folder.is_dir():
        return
    if is_earlier_demo_index(index_folder):
        print(f"Recording {index_folder}, written by an earlier demo, in {record_path.name}")
        record_output(recorded, record_path, index_folder)


def reject_unrecorded_output(path: Path) -> None:
    raise SystemExit(
        f"{path} exists, and {RECORD_FILE_NAME} does not record it as an output of an earlier demo run, "
        "or it was changed since. Move it away or rerun with --overwrite to replace it."
    )


def check_outputs_writable(output_folder: Path, recorded: dict[str, Any], overwrite: bool) -> None:
    """Raise SystemExit when an output exists that neither the demo wrote nor --overwrite allows.

    A folder at a file's path, and a folder at the index's path that is neither empty nor a
    Lookalike index, are rejected even with ``overwrite``, because the demo deletes no folder.
    """
    for name in OUTPUT_FILE_NAMES:
        path = output_folder / name
        if not path.exists():
            continue
        if not path.is_file():
            raise SystemExit(
                f"{path} is not a file, and the demo replaces only a file there, even with --overwrite. "
                "Move it away or pass another --output-folder."
            )
        if not overwrite and recorded.get(name) != file_sha256(path):
            reject_unrecorded_output(path)

    index_folder = output_folder / INDEX_FOLDER_NAME
    if not index_folder.exists():
        return
    if not index_folder.is_dir() or index_folder_state(index_folder) == FOLDER_FOREIGN:
        raise SystemExit(
            f"{index_folder} is neither empty nor a Lookalike index folder, and the demo replaces only an index "
            "there, even with --overwrite. Move it away or pass another --output-folder."
        )
    if index_folder_state(index_folder) == FOLDER_EMPTY or overwrite:
        return
    if not folder_matches_record(index_folder, recorded.get(INDEX_FOLDER_NAME)):
        reject_unrecorded_output(index_folder)


def record_output(recorded: dict[str, Any], record_path: Path, path: Path) -> None:
    """Add the checksums of the output just written at ``path`` and save the record.

    Saving after each output keeps the record true when a later step fails, so the next run
    still recognises what this one wrote.
    """
    recorded[path.name] = folder_checksums(path) if path.is_dir() else file_sha256(path)
    # Written beside the record and renamed over it, so a failed write leaves the old record whole.
    # write_text creates the file with the umask applied (0644 under the usual 022), where
    # tempfile would create it 0600. A temporary file left by a crashed run is removed first,
    # because writing into it would keep its mode.
    temporary_path = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
    temporary_path.unlink(missing_ok=True)
    temporary_path.write_text(json.dumps(recorded, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary_path, record_path)


def report_progress(progress: Progress) -> None:
    eta = f", about {progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
    print(f"  {progress.tiles_done}/{progress.tiles_total} tiles ({progress.rate_tiles_per_s:.1f} tiles/s{eta})",
          flush=True)


def build_demo_index(index_folder: Path, encoder_path: Path) -> BuildReport:
    """Index the sample clip with the demo's tile size and overlap, replacing an earlier demo index."""
    params = BuildParameters(
        source_paths=(str(SAMPLE_RASTER),),
        index_folder=str(index_folder),
        encoder_path=str(encoder_path),
        tile_size_source_px=DEMO_TILE_SIZE_SOURCE_PX,
        overlap_fraction=DEMO_OVERLAP_FRACTION,
        # check_outputs_writable has already rejected an index that the demo did not write unless
        # --overwrite was given, and any folder that is neither empty nor an index.
        overwrite_existing_index=True,
    )
    return build_index(params, progress=report_progress)


def run_demo(output_folder: Path, encoder_path: Path, k: int, overwrite: bool) -> list[Match]:
    """Build the index, search, and write the GeoPackage and the map; return the matches."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer

    from lookalike.gis.map_render import query_outline_layer, render_map_png
    from lookalike.gis.matches import matches_to_memory_layer, write_matches

    output_folder.mkdir(parents=True, exist_ok=True)
    matches_path = output_folder / MATCHES_FILE_NAME
    map_path = output_folder / MAP_FILE_NAME
    index_folder = output_folder / INDEX_FOLDER_NAME
    record_path = output_folder / RECORD_FILE_NAME
    recorded = read_record(record_path, overwrite)
    upgrade_earlier_record(recorded, record_path, index_folder)
    check_outputs_writable(output_folder, recorded, overwrite)

    print(f"Indexing {SAMPLE_RASTER.name} with {encoder_path.name}: tiles of {DEMO_TILE_SIZE_SOURCE_PX} px, "
          f"overlap {DEMO_OVERLAP_FRACTION}")
    report = build_demo_index(index_folder, encoder_path)
    record_output(recorded, record_path, index_folder)
    print(f"Indexed {report.tiles_embedded} tiles ({report.tiles_skipped} skipped) in {report.elapsed_s:.1f} s, "
          f"{report.rate_tiles_per_s:.1f} tiles/s")

    started_at = time.monotonic()
    matches = run_search(index_folder, SAMPLE_RASTER, [DEMO_QUERY_BOUNDS_M], k=k,
                         crs_wkt=SAMPLE_CRS, encoder_path=encoder_path)
    print(f"Search took {time.monotonic() - started_at:.2f} s; top {len(matches)} matches:")
    for match in matches:
        centre_x = (match.bounds[0] + match.bounds[2]) / 2
        centre_y = (match.bounds[1] + match.bounds[3]) / 2
        ship = ship_in_footprint(match) or "no ship centre inside"
        print(f"  {match.rank}. score {match.score:.3f}  tile ({match.row}, {match.col})  "
              f"centre ({centre_x:.0f}, {centre_y:.0f})  {ship}")

    crs = QgsCoordinateReferenceSystem(SAMPLE_CRS)
    layer = matches_to_memory_layer(matches, "Lookalike matches", crs, encoder_name=report.encoder_name,
                                    query_label="box around the north-west ship")
    write_matches(layer, matches_path, overwrite=True)
    record_output(recorded, record_path, matches_path)
    raster_layer = QgsRasterLayer(str(SAMPLE_RASTER), SAMPLE_RASTER.stem)
    render_map_png(raster_layer, map_path, match_layer=layer,
                   query_layer=query_outline_layer([DEMO_QUERY_BOUNDS_M], crs), overwrite=True)
    record_output(recorded, record_path, map_path)
    print(f"Wrote {matches_path} and {map_path}")
    return matches


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from qgis.core import QgsApplication

    application = None
    if QgsApplication.instance() is None:
        application = QgsApplication([], False)
        application.initQgis()
    try:
        matches = run_demo(arguments.output_folder, arguments.encoder, arguments.k, arguments.overwrite)
    except LookalikeError as error:
        # The plugin's errors name the value and the fix, so a traceback would add only noise.
        raise SystemExit(f"The demo failed: {error}") from error
    finally:
        if application is not None:
            application.exitQgis()

    found = {ship_in_footprint(match) for match in matches} - {None}
    others = set(SHIP_CENTRES_M) - {"north-west"}
    print(f"Other ships among the top {len(matches)}: {len(found & others)} of {len(others)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
