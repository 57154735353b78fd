"""The ship demo on the shipped RapidEye clip: a box around one ship finds the other three.

Runs the real pipeline with the plugin's default encoder (an EfficientNet-Lite0 under models/,
about 740 tiles, 15-30 s on two CPU cores) through tools/run_demo.py, so the demo's tile size,
overlap and query box are what is tested.
"""

import json
from pathlib import Path

import pytest
import run_demo
from qgis.core import QgsVectorLayer
from qgis.PyQt.QtGui import QImage

from lookalike.core.encoder import default_model_path
from lookalike.core.pipeline import run_search

# run_demo is tools/run_demo.py; tests/conftest.py puts tools/ on sys.path.

# The clip's geotransform: top-left corner (557050, 4176460) in EPSG:32610, 5 m square pixels.
CLIP_ORIGIN_X_M = 557050.0
CLIP_ORIGIN_Y_M = 4176460.0
CLIP_PIXEL_SIZE_M = 5.0

# Ships measured by hand on the clip: pixels whose mean of R, G and B exceeds 120 (open water
# is 40-90) were grouped into 8-connected components with scipy.ndimage.label, which gave
# exactly four components of 270-335 pixels. Centroid = mean (col + 0.5, row + 0.5) of a
# component; span = its first and last column and row. Checked by eye on a PNG rendering.
SHIPS = {
    # name: (centroid col, centroid row, (first col, last col, first row, last row))
    "north-west": (135.3, 47.1, (128, 141, 25, 68)),
    "north-centre": (308.3, 70.2, (300, 316, 53, 86)),
    "north-east": (446.0, 87.1, (437, 454, 71, 103)),
    "south": (364.7, 307.0, (355, 373, 286, 327)),
}
# A drawn box leaves some water around the ship.
QUERY_MARGIN_PX = 4
TOP_K = 5


def pixel_to_map(col: float, row: float) -> tuple:
    return CLIP_ORIGIN_X_M + col * CLIP_PIXEL_SIZE_M, CLIP_ORIGIN_Y_M - row * CLIP_PIXEL_SIZE_M


def ship_centre_m(name: str) -> tuple:
    col, row, _ = SHIPS[name]
    return pixel_to_map(col, row)


def query_box_m(name: str) -> tuple:
    first_col, last_col, first_row, last_row = SHIPS[name][2]
    xmin, ymax = pixel_to_map(first_col - QUERY_MARGIN_PX, first_row - QUERY_MARGIN_PX)
    xmax, ymin = pixel_to_map(last_col + 1 + QUERY_MARGIN_PX, last_row + 1 + QUERY_MARGIN_PX)
    return xmin, ymin, xmax, ymax


def rank_of_ship(matches, name: str):
    """Return the rank of the first match whose footprint contains the ship's centroid."""
    x, y = ship_centre_m(name)
    for match in matches:
        xmin, ymin, xmax, ymax = match.bounds
        if xmin <= x <= xmax and ymin <= y <= ymax:
            return match.rank
    return None


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    if not default_model_path().is_file():
        pytest.skip(f"the bundled encoder {default_model_path()} is missing")
    output_folder = tmp_path_factory.mktemp("demo")
    assert run_demo.main(["--output-folder", str(output_folder)]) == 0
    return output_folder


def test_measured_ships_match_demo_constants():
    for name, demo_name in (("north-west", "north-west"), ("north-centre", "north-centre"),
                            ("north-east", "north-east (red hull)"), ("south", "south")):
        assert run_demo.SHIP_CENTRES_M[demo_name] == pytest.approx(ship_centre_m(name), abs=1.0)
    assert query_box_m("north-west") == pytest.approx(run_demo.DEMO_QUERY_BOUNDS_M)


@pytest.mark.parametrize("query_ship", sorted(SHIPS))
def test_box_around_one_ship_finds_the_others(demo_output, query_ship):
    matches = run_search(
        demo_output / run_demo.INDEX_FOLDER_NAME,
        run_demo.SAMPLE_RASTER,
        [query_box_m(query_ship)],
        k=TOP_K,
        crs_wkt=run_demo.SAMPLE_CRS,
    )

    assert len(matches) == TOP_K
    assert rank_of_ship(matches, query_ship) is None
    for other_ship in sorted(set(SHIPS) - {query_ship}):
        rank = rank_of_ship(matches, other_ship)
        assert rank is not None, f"{other_ship} ship not in the top {TOP_K} for a query on the {query_ship} ship"


def test_demo_writes_geopackage_and_map(demo_output):
    matches_path = demo_output / run_demo.MATCHES_FILE_NAME
    layer = QgsVectorLayer(f"{matches_path}|layername=Lookalike matches", "matches", "ogr")

    assert layer.isValid()
    assert layer.featureCount() == run_demo.DEMO_K
    assert layer.crs().authid() == "EPSG:32610"
    ranks = sorted(feature["rank"] for feature in layer.getFeatures())
    assert ranks == list(range(1, run_demo.DEMO_K + 1))
    image = QImage(str(demo_output / run_demo.MAP_FILE_NAME))
    assert not image.isNull()
    assert image.width() > 0
    recorded = json.loads((demo_output / run_demo.RECORD_FILE_NAME).read_text(encoding="utf-8"))
    assert set(recorded) == {run_demo.MATCHES_FILE_NAME, run_demo.MAP_FILE_NAME}


def test_demo_keeps_a_users_file(tmp_path):
    user_file = tmp_path / run_demo.MATCHES_FILE_NAME
    user_file.write_bytes(b"analyst's own results")

    with pytest.raises(SystemExit, match="--overwrite"):
        run_demo.main(["--output-folder", str(tmp_path)])

    assert user_file.read_bytes() == b"analyst's own results"
    assert not (tmp_path / run_demo.INDEX_FOLDER_NAME).exists()
