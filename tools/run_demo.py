"""Headless demo: index the shipped RapidEye clip, search with a box around one ship, write results.

    .venv/bin/python tools/run_demo.py [--output-folder output] [--encoder MODEL.onnx] [--k 5] [--overwrite]

Writes ``matches.gpkg`` (the ranked match footprints), ``matches.png`` (the clip with the query
box and the matches) and the index ``demo_index/`` into the output folder. The demo replaces
its own earlier outputs, which it recognises by the checksums in ``demo_outputs.json``. Any
other file at those paths is left alone unless ``--overwrite`` is given.

Starts its own offscreen QgsApplication, so no display is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devimport import REPO_ROOT, import_lookalike

import_lookalike()

from lookalike.core.encoder import default_model_path  # noqa: E402
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


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-folder", type=Path, default=REPO_ROOT / "output",
                        help="folder for matches.gpkg, matches.png and demo_index/ (default: output/)")
    parser.add_argument("--encoder", type=Path, default=None,
                        help="ONNX encoder to index with (default: the plugin's default model under models/)")
    parser.add_argument("--k", type=int, default=DEMO_K, help=f"number of matches (default: {DEMO_K})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace matches.gpkg and matches.png even when the demo did not write them")
    return parser.parse_args(argv)


def ship_in_footprint(match: Match) -> Optional[str]:
    """Return the name of the ship whose centroid lies inside the match footprint, if any."""
    xmin, ymin, xmax, ymax = match.bounds
    for name, (x, y) in SHIP_CENTRES_M.items():
        if xmin <= x <= xmax and ymin <= y <= ymax:
            return name
    return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_outputs_writable(paths: Sequence[Path], record_path: Path, overwrite: bool) -> None:
    """Raise SystemExit when an output exists that neither the demo wrote nor --overwrite allows."""
    recorded = {}
    if record_path.is_file():
        recorded = json.loads(record_path.read_text(encoding="utf-8"))
    for path in paths:
        if not path.exists() or overwrite:
            continue
        if recorded.get(path.name) != file_sha256(path):
            raise SystemExit(
                f"{path} exists and was not written by an earlier demo run (or was changed since); "
                "move it away or rerun with --overwrite to replace it."
            )


def record_outputs(paths: Sequence[Path], record_path: Path) -> None:
    record_path.write_text(json.dumps({path.name: file_sha256(path) for path in paths}, indent=2), encoding="utf-8")


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
        # build_index rejects any folder that is not an index, so only an earlier index is replaced.
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
    record_path = output_folder / RECORD_FILE_NAME
    check_outputs_writable([matches_path, map_path], record_path, overwrite)

    print(f"Indexing {SAMPLE_RASTER.name} with {encoder_path.name}: tiles of {DEMO_TILE_SIZE_SOURCE_PX} px, "
          f"overlap {DEMO_OVERLAP_FRACTION}")
    report = build_demo_index(output_folder / INDEX_FOLDER_NAME, encoder_path)
    print(f"Indexed {report.tiles_embedded} tiles ({report.tiles_skipped} skipped) in {report.elapsed_s:.1f} s, "
          f"{report.rate_tiles_per_s:.1f} tiles/s")

    started_at = time.monotonic()
    matches = run_search(output_folder / INDEX_FOLDER_NAME, SAMPLE_RASTER, [DEMO_QUERY_BOUNDS_M], k=k,
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
    raster_layer = QgsRasterLayer(str(SAMPLE_RASTER), SAMPLE_RASTER.stem)
    render_map_png(raster_layer, map_path, match_layer=layer,
                   query_layer=query_outline_layer([DEMO_QUERY_BOUNDS_M], crs), overwrite=True)
    record_outputs([matches_path, map_path], record_path)
    print(f"Wrote {matches_path} and {map_path}")
    return matches


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    encoder_path = arguments.encoder or default_model_path()
    if not encoder_path.is_file():
        print(f"Encoder {encoder_path} not found; pass --encoder with an ONNX encoder file.", file=sys.stderr)
        return 2

    from qgis.core import QgsApplication

    application = None
    if QgsApplication.instance() is None:
        application = QgsApplication([], False)
        application.initQgis()
    try:
        matches = run_demo(arguments.output_folder, encoder_path, arguments.k, arguments.overwrite)
    finally:
        if application is not None:
            application.exitQgis()

    found = {ship_in_footprint(match) for match in matches} - {None}
    others = set(SHIP_CENTRES_M) - {"north-west"}
    print(f"Other ships among the top {len(matches)}: {len(found & others)} of {len(others)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
