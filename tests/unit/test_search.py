"""Tests of search(): query strategies, negatives, overlap suppression and widening."""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from osgeo import osr

from lookalike.core import index as index_module
from lookalike.core import search as search_module
from lookalike.core.errors import SearchError
from lookalike.core.grid import TileGrid
from lookalike.core.index import TileIndex, make_tile_table
from lookalike.core.query import QueryChips
from lookalike.core.search import (
    Match,
    compare_query_strategies,
    example_embeddings,
    negative_example_warnings,
    negatives_like_positives,
    negatives_without_effect,
    overlap_fraction,
    search,
)

EMBEDDING_DIM = 32
N_ROWS = 8
N_COLS = 8


def crs_wkt(epsg: int) -> str:
    reference = osr.SpatialReference()
    reference.ImportFromEPSG(epsg)
    return reference.ExportToWkt()


UTM_WKT = crs_wkt(32633)


def overlapping_grid() -> TileGrid:
    # 100 m tiles every 50 m, so each tile overlaps its neighbours by half, as in a build with
    # overlap_fraction=0.5.
    return TileGrid(
        crs_wkt=UTM_WKT,
        origin_x=500000.0,
        origin_y=4000000.0,
        gsd=1.0,
        tile_size_px=100,
        stride_px=50,
        n_rows=N_ROWS,
        n_cols=N_COLS,
    )


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_unit_vectors(n: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, EMBEDDING_DIM)))


def build_index(folder: Path, embeddings: np.ndarray) -> TileIndex:
    """Index one embedding per grid tile in row-major order, so tile id = row * N_COLS + col."""
    index = TileIndex.create(folder, {"name": "test", "checksum": "c" * 64, "embedding_dim": EMBEDDING_DIM, "spec": {}})
    grid = overlapping_grid()
    source_id = index.add_source({"path": "/data/scene.tif", "crs_wkt": UTM_WKT, "grid": grid.to_dict()})
    n = embeddings.shape[0]
    index.add(embeddings, make_tile_table(source_id, np.arange(n) // N_COLS, np.arange(n) % N_COLS))
    return index


def smooth_field_embeddings(query: np.ndarray, seed: int) -> np.ndarray:
    """Return tile embeddings whose similarity to ``query`` falls off with distance from tile (3, 3).

    Neighbouring tiles then score almost as high as the best one, like the overlapping tiles
    around an object in real imagery.
    """
    rows, cols = np.divmod(np.arange(N_ROWS * N_COLS), N_COLS)
    distance = np.hypot(rows - 3, cols - 3)
    noise = random_unit_vectors(N_ROWS * N_COLS, seed)
    return unit(query[None, :] * (4.0 - 0.4 * distance[:, None]) + 0.6 * noise)


def intersection_over_smaller(first: tuple, second: tuple) -> float:
    width = max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
    height = max(0.0, min(first[3], second[3]) - max(first[1], second[1]))
    smaller = min((first[2] - first[0]) * (first[3] - first[1]), (second[2] - second[0]) * (second[3] - second[1]))
    return width * height / smaller


def greedy_reference(index: TileIndex, query: np.ndarray, k: int, max_overlap: float) -> list:
    """Rank all tiles by exact cosine and suppress greedily: what search() must reproduce."""
    scores = index.embeddings.astype(np.float64) @ unit(query)[0].astype(np.float64)
    order = np.lexsort((np.arange(scores.size), -scores.astype(np.float32)))
    kept_tile_ids: list = []
    for tile_id in order.tolist():
        bounds = index.tile_bounds(tile_id)
        overlaps = [intersection_over_smaller(bounds, index.tile_bounds(other)) for other in kept_tile_ids]
        if all(overlap <= max_overlap for overlap in overlaps):
            kept_tile_ids.append(tile_id)
        if len(kept_tile_ids) == k:
            break
    return kept_tile_ids


# -- results -------------------------------------------------------------------------------------------


def test_best_match_fields(tmp_path: Path) -> None:
    embeddings = random_unit_vectors(N_ROWS * N_COLS, seed=1)
    index = build_index(tmp_path / "index", embeddings)

    matches = search(index, embeddings[19], k=3)

    best = matches[0]
    assert isinstance(best, Match)
    assert best.rank == 1
    assert best.tile_id == 19
    assert best.score == pytest.approx(1.0, abs=1e-3)
    assert (best.source_id, best.row, best.col) == (0, 2, 3)
    assert best.bounds == overlapping_grid().tile_bounds(2, 3)
    assert best.crs_wkt == UTM_WKT
    assert best.source_path == "/data/scene.tif"
    assert [match.rank for match in matches] == [1, 2, 3]
    assert [match.score for match in matches] == sorted((match.score for match in matches), reverse=True)


def test_overlapping_neighbours_suppressed(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=2)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=3))

    unsuppressed = search(index, query, k=5, max_overlap=1.0)
    suppressed = search(index, query, k=5, max_overlap=0.25)

    assert unsuppressed[0].tile_id == suppressed[0].tile_id == 27
    # Without suppression the runners-up are the half-overlapping neighbours of the best tile.
    assert intersection_over_smaller(unsuppressed[0].bounds, unsuppressed[1].bounds) == pytest.approx(0.5)
    assert len(suppressed) == 5
    for position, match in enumerate(suppressed):
        for better in suppressed[:position]:
            assert intersection_over_smaller(match.bounds, better.bounds) <= 0.25


def test_suppression_matches_greedy_reference(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=4)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=5))

    for max_overlap in (0.0, 0.25, 0.5):
        matches = search(index, query, k=6, max_overlap=max_overlap)
        assert [match.tile_id for match in matches] == greedy_reference(index, query, 6, max_overlap)


def test_widening_until_k_survivors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "INITIAL_CANDIDATES_PER_MATCH", 1)
    query = random_unit_vectors(1, seed=6)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=7))
    requested_sizes: list = []
    real_knn = index.knn

    def recording_knn(vectors: np.ndarray, k: int, ef: object = None) -> tuple:
        requested_sizes.append(k)
        return real_knn(vectors, k, ef)

    monkeypatch.setattr(index, "knn", recording_knn)

    # max_overlap=0 keeps only tiles that share no area, so most candidates are suppressed.
    expected = greedy_reference(index, query, 12, 0.0)
    assert len(expected) == 12
    matches = search(index, query, k=12, max_overlap=0.0)

    assert [match.tile_id for match in matches] == expected
    assert requested_sizes[0] == 12
    assert len(requested_sizes) > 1
    assert requested_sizes == sorted(requested_sizes)


def test_widening_stops_when_index_exhausted(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=8)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=9))

    expected = greedy_reference(index, query, 40, 0.0)
    assert len(expected) < 40

    matches = search(index, query, k=40, max_overlap=0.0)

    assert [match.tile_id for match in matches] == expected


def test_search_through_hnsw_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "EXACT_SEARCH_MAX_TILES", 0)
    monkeypatch.setattr(index_module, "EXACT_SEARCH_MIN_FRACTION", 2.0)
    query = random_unit_vectors(1, seed=10)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=11))

    matches = search(index, query, k=6, max_overlap=0.25)

    assert [match.tile_id for match in matches] == greedy_reference(index, query, 6, 0.25)


# -- exclusion of the query footprint --------------------------------------------------------------------


def test_query_footprint_excluded(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=12)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=13))
    query_footprint = index.tile_bounds(27)

    matches = search(index, query, k=5, exclude=[(query_footprint, UTM_WKT)])

    assert 27 not in [match.tile_id for match in matches]
    for match in matches:
        assert intersection_over_smaller(match.bounds, query_footprint) <= 0.25


@pytest.mark.parametrize("item", [(500000.0, 4000000.0, 500100.0, 3999900.0), ((1.0, 2.0, 3.0), UTM_WKT), "POLYGON"])
def test_exclude_of_other_shape_named(tmp_path: Path, item) -> None:
    query = random_unit_vectors(1, seed=12)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=13))

    with pytest.raises(SearchError, match=r"exclude item 0 .* is not a footprint; pass each as \(\(xmin"):
        search(index, query, k=5, exclude=[item])


def test_query_over_every_tile_says_why_nothing_matches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    query = random_unit_vectors(1, seed=12)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=13))
    corners = [index.tile_bounds(tile_id) for tile_id in range(index.count)]
    whole = (min(b[0] for b in corners), min(b[1] for b in corners), max(b[2] for b in corners),
             max(b[3] for b in corners))

    with caplog.at_level(logging.WARNING):
        assert search(index, query, k=5, exclude=[(whole, UTM_WKT)]) == []

    assert f"every one of the index's {index.count} tiles overlaps the query" in caplog.text


@pytest.mark.parametrize("min_score", [2.0, 1.01, float("nan"), True])
def test_min_score_out_of_range_is_rejected(tmp_path: Path, min_score) -> None:
    query = random_unit_vectors(1, seed=12)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=13))

    with pytest.raises(SearchError, match="min_score .* is not a number up to 1; no score exceeds 1"):
        search(index, query, k=5, min_score=min_score)


def test_each_example_counts_once_in_the_mean() -> None:
    drawn = random_unit_vectors(9, seed=31)  # a negative drawn over nine tiles
    marked = random_unit_vectors(1, seed=32)  # one tile marked not relevant

    rows = example_embeddings([drawn, marked], "mean")

    assert rows.shape == (2, drawn.shape[1])
    np.testing.assert_allclose(rows[0], unit(drawn.mean(axis=0, keepdims=True))[0], atol=1e-6)
    np.testing.assert_allclose(rows[1], marked[0], atol=1e-6)
    # The mean negative the search subtracts now gives the marked tile half the weight, not a tenth.
    np.testing.assert_allclose(rows.mean(axis=0) @ marked[0], 0.5 * (1 + rows[0] @ marked[0]), atol=1e-6)


def test_negative_like_the_positives_among_others_is_counted() -> None:
    positive = random_unit_vectors(1, seed=41)
    water = random_unit_vectors(1, seed=42)

    # Drawn over the example itself, the second negative equals the positive.
    assert negatives_like_positives(positive, np.concatenate([water, positive])) == 1
    assert negatives_like_positives(positive, water) == 0


def test_negative_warning_names_which_negatives() -> None:
    rng = np.random.default_rng(8)
    positive = unit(rng.standard_normal((1, EMBEDDING_DIM)))
    water = unit(rng.standard_normal((2, EMBEDDING_DIM)))

    one = negative_example_warnings(positive, np.concatenate([water[:1], positive, water[1:]]))
    two = negative_example_warnings(positive, np.concatenate([positive, water, positive]))

    assert len(one) == 1
    assert one[0].startswith("Negative example 2 of 3 (counted in the order given) looks like")
    assert len(two) == 1
    assert two[0].startswith("Negative examples 1 and 4 of 4 (counted in the order given) look like")


def test_max_strategy_keeps_every_chip() -> None:
    drawn, marked = random_unit_vectors(9, seed=31), random_unit_vectors(1, seed=32)

    np.testing.assert_array_equal(example_embeddings([drawn, marked], "max"), np.concatenate([drawn, marked]))


def test_query_footprint_in_other_crs(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=12)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=13))
    xmin, ymin, xmax, ymax = index.tile_bounds(27)
    to_wgs84 = osr.CoordinateTransformation(_gis_order(UTM_WKT), _gis_order(crs_wkt(4326)))
    footprint_degrees = to_wgs84.TransformBounds(xmin, ymin, xmax, ymax, 21)

    # The round trip through degrees widens the box by millimetres, so max_overlap stays clear
    # of the 0.25 that diagonal neighbours share exactly.
    in_utm = search(index, query, k=5, exclude=[((xmin, ymin, xmax, ymax), UTM_WKT)], max_overlap=0.3)
    in_degrees = search(index, query, k=5, exclude=[(footprint_degrees, crs_wkt(4326))], max_overlap=0.3)

    assert [match.tile_id for match in in_degrees] == [match.tile_id for match in in_utm]


def test_footprints_in_other_crs_transformed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two rasters in neighbouring UTM zones: each kept match is compared with every later
    # candidate of the other zone, so its bounds in that zone must be computed only once.
    index = TileIndex.create(tmp_path / "index",
                             {"name": "test", "checksum": "c" * 64, "embedding_dim": EMBEDDING_DIM, "spec": {}})
    tile_count = N_ROWS * N_COLS
    for epsg in (32633, 32634):
        grid = dataclasses.replace(overlapping_grid(), crs_wkt=crs_wkt(epsg))
        source_id = index.add_source({"path": f"/data/{epsg}.tif", "crs_wkt": crs_wkt(epsg), "grid": grid.to_dict()})
        index.add(random_unit_vectors(tile_count, seed=epsg),
                  make_tile_table(source_id, np.arange(tile_count) // N_COLS, np.arange(tile_count) % N_COLS))
    transformed = []
    make_transform = search_module._make_transform

    class CountingTransform:
        def __init__(self, transform) -> None:
            self._transform = transform

        def TransformBounds(self, *arguments):  # noqa: N802 - the OSR method it stands for
            transformed.append(arguments[:4])
            return self._transform.TransformBounds(*arguments)

    monkeypatch.setattr(search_module, "_make_transform",
                        lambda from_wkt, to_wkt: CountingTransform(make_transform(from_wkt, to_wkt)))
    k = 40

    matches = search(index, random_unit_vectors(1, seed=3)[0], k=k, max_overlap=0.25)

    assert len(matches) == k
    # Each kept match at most once into the other zone.
    assert len(transformed) <= k


def _gis_order(wkt: str) -> osr.SpatialReference:
    reference = osr.SpatialReference()
    reference.ImportFromWkt(wkt)
    reference.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return reference


def test_overlap_fraction_cases() -> None:
    tile = (0.0, 0.0, 100.0, 100.0)
    assert overlap_fraction(tile, (50.0, 0.0, 150.0, 100.0)) == pytest.approx(0.5)
    assert overlap_fraction(tile, (100.0, 0.0, 200.0, 100.0)) == 0.0
    assert overlap_fraction(tile, (10.0, 10.0, 20.0, 20.0)) == 1.0
    assert overlap_fraction(tile, (40.0, 40.0, 40.0, 40.0)) == 1.0
    assert overlap_fraction(tile, (140.0, 40.0, 140.0, 40.0)) == 0.0


# -- edge cases --------------------------------------------------------------------------------------------


def test_k_larger_than_index(tmp_path: Path) -> None:
    embeddings = random_unit_vectors(10, seed=14)
    index = build_index(tmp_path / "index", embeddings)

    matches = search(index, embeddings[0], k=100, max_overlap=1.0)

    assert len(matches) == 10
    assert sorted(match.tile_id for match in matches) == list(range(10))


def test_empty_index_returns_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = build_index(tmp_path / "index", np.empty((0, EMBEDDING_DIM), dtype=np.float32))

    with caplog.at_level(logging.WARNING, logger="lookalike"):
        matches = search(index, random_unit_vectors(1, seed=15), k=5)

    assert matches == []
    assert "is empty" in caplog.text


def test_duplicates_rank_by_tile_id(tmp_path: Path) -> None:
    embeddings = random_unit_vectors(N_ROWS * N_COLS, seed=16)
    duplicate_ids = [40, 5, 63, 22]
    embeddings[duplicate_ids] = embeddings[30]
    index = build_index(tmp_path / "index", embeddings)

    for strategy in ("mean", "max"):
        matches = search(index, embeddings[30], k=5, max_overlap=1.0, strategy=strategy)
        assert [match.tile_id for match in matches] == [5, 22, 30, 40, 63]
        assert len({match.score for match in matches}) == 1


def test_blank_query_rejected(tmp_path: Path) -> None:
    index = build_index(tmp_path / "index", random_unit_vectors(4, seed=17))
    with pytest.raises(SearchError, match="blank or nodata"):
        search(index, np.zeros(EMBEDDING_DIM), k=3)
    with pytest.raises(SearchError, match="negative embedding 1 is all zeros"):
        negatives = np.vstack([random_unit_vectors(1, seed=19), np.zeros((1, EMBEDDING_DIM))])
        search(index, random_unit_vectors(1, seed=18), negatives)
    with pytest.raises(SearchError, match="NaN"):
        search(index, np.full(EMBEDDING_DIM, np.nan), k=3)


def test_invalid_parameters_rejected(tmp_path: Path) -> None:
    index = build_index(tmp_path / "index", random_unit_vectors(4, seed=20))
    query = random_unit_vectors(1, seed=21)
    with pytest.raises(SearchError, match="32-dim"):
        search(index, np.ones(8), k=3)
    with pytest.raises(SearchError, match="k 0"):
        search(index, query, k=0)
    with pytest.raises(SearchError, match="max_overlap 1.5"):
        search(index, query, max_overlap=1.5)
    with pytest.raises(SearchError, match="strategy 'median'"):
        search(index, query, strategy="median")
    with pytest.raises(SearchError, match="negative_weight -1"):
        search(index, query, negative_weight=-1.0)


def test_min_score_drops_weak_matches(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=22)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=23))
    everything = search(index, query, k=64, max_overlap=1.0)
    threshold = everything[9].score

    matches = search(index, query, k=64, max_overlap=1.0, min_score=threshold)

    assert len(matches) >= 10
    assert all(match.score >= threshold for match in matches)
    assert len(matches) < len(everything)
    assert search(index, query, k=5, min_score=1.0) == []


# -- positives and negatives ------------------------------------------------------------------------------


def negative_demotion_index(folder: Path) -> tuple:
    """Return an index and query vectors where tile 9 resembles positive and negative, tile 54 only the positive."""
    rng = np.random.default_rng(24)
    basis = np.linalg.qr(rng.standard_normal((EMBEDDING_DIM, EMBEDDING_DIM)))[0].astype(np.float32)
    positive, negative, other = basis[0], basis[1], basis[2]
    embeddings = unit(0.2 * rng.standard_normal((N_ROWS * N_COLS, EMBEDDING_DIM)) + basis[3:4])
    # Tiles 9 (row 1, col 1) and 54 (row 6, col 6) are far apart, so suppression stays out of it.
    embeddings[9] = unit(positive + 0.8 * negative)[0]
    embeddings[54] = unit(positive + 0.9 * other)[0]
    return build_index(folder, embeddings), positive, negative


@pytest.mark.parametrize("strategy", ["mean", "max"])
def test_negative_demotes_similar_tile(tmp_path: Path, strategy: str) -> None:
    index, positive, negative = negative_demotion_index(tmp_path / "index")

    plain = search(index, positive, k=2, strategy=strategy)
    with_negative = search(index, positive, negative, k=2, strategy=strategy)

    assert [match.tile_id for match in plain] == [9, 54]
    assert [match.tile_id for match in with_negative] == [54, 9]


def test_max_strategy_widens_past_demoted_tile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One candidate per match: the first round finds only tile 9, which the negative demotes
    # below tiles not yet seen, so search() must widen before it can trust the ranking.
    monkeypatch.setattr(search_module, "INITIAL_CANDIDATES_PER_MATCH", 1)
    index, positive, negative = negative_demotion_index(tmp_path / "index")

    matches = search(index, positive, negative, k=1, strategy="max")

    assert [match.tile_id for match in matches] == [54]


def test_mean_strategy_score_is_cosine(tmp_path: Path) -> None:
    index, positive, negative = negative_demotion_index(tmp_path / "index")

    matches = search(index, positive, negative, k=64, max_overlap=1.0, strategy="mean")

    assert all(-1.0 <= match.score <= 1.0 for match in matches)


def test_cancelling_negatives_rejected(tmp_path: Path) -> None:
    index, positive, _ = negative_demotion_index(tmp_path / "index")
    with pytest.raises(SearchError, match="cancel out"):
        search(index, positive, positive, negative_weight=1.0, strategy="mean")


def test_huge_query_values_keep_their_direction(tmp_path: Path) -> None:
    index, positive, _ = negative_demotion_index(tmp_path / "index")
    # Squares of these values overflow float32, which once scaled the query to zero.
    huge = (positive / np.abs(positive).max() * 1e38).astype(np.float32)

    assert [m.tile_id for m in search(index, huge, k=3)] == [m.tile_id for m in search(index, positive, k=3)]


def test_max_strategy_serves_each_positive(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    basis = np.linalg.qr(rng.standard_normal((EMBEDDING_DIM, EMBEDDING_DIM)))[0].astype(np.float32)
    embeddings = unit(0.3 * rng.standard_normal((N_ROWS * N_COLS, EMBEDDING_DIM)) + basis[2:3])
    # Two kinds of the same object: tiles 0 and 63 each copy one positive exactly.
    embeddings[0] = basis[0]
    embeddings[63] = basis[1]
    index = build_index(tmp_path / "index", embeddings)

    matches = search(index, basis[:2], k=2, strategy="max")

    assert [match.tile_id for match in matches] == [0, 63]
    assert matches[0].score == pytest.approx(1.0, abs=1e-3)


def test_compare_query_strategies_reports_precision(tmp_path: Path) -> None:
    index, positive, negative = negative_demotion_index(tmp_path / "index")

    precision = compare_query_strategies(index, positive, negative, relevant_tile_ids=[54], k=1)

    assert precision == {"mean": 1.0, "max": 1.0}
    assert compare_query_strategies(index, positive, None, relevant_tile_ids=[54], k=1) == {"mean": 0.0, "max": 0.0}


# -- query exclusion and default suppression ------------------------------------------------------


def test_query_footprint_excluded_without_suppression(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=12)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=13))
    query_footprint = index.tile_bounds(27)

    matches = search(index, query, k=5, exclude=[(query_footprint, UTM_WKT)], max_overlap=1.0)

    for match in matches:
        assert intersection_over_smaller(match.bounds, query_footprint) == 0.0


def test_zero_max_overlap_gives_distinct_places(tmp_path: Path) -> None:
    query = random_unit_vectors(1, seed=2)[0]
    index = build_index(tmp_path / "index", smooth_field_embeddings(query, seed=3))

    matches = search(index, query, k=8, max_overlap=0.0)

    assert len(matches) == 8
    for position, match in enumerate(matches):
        for better in matches[:position]:
            # Tiles that only share an edge are distinct places and stay.
            assert intersection_over_smaller(match.bounds, better.bounds) == 0.0


def test_negative_like_positive_detected():
    rng = np.random.default_rng(8)
    positive = rng.normal(size=(1, 16))
    other = rng.normal(size=(1, 16))

    assert negatives_without_effect(positive, positive.copy())
    assert negatives_without_effect(positive, 2.0 * positive)
    assert not negatives_without_effect(positive, other)
    assert not negatives_without_effect(positive, positive.copy(), strategy="max")
    assert not negatives_without_effect(positive, None)


def test_max_negative_like_positive_warned():
    from lookalike.core.search import NEGATIVES_ONLY_SCALE_SCORES_MESSAGE, negative_example_warnings

    positive = random_unit_vectors(1, seed=51)
    other = random_unit_vectors(1, seed=52)

    assert negative_example_warnings(positive, positive.copy(), "max") == [NEGATIVES_ONLY_SCALE_SCORES_MESSAGE]
    assert negative_example_warnings(positive, other, "max") == []
    # With two positives, a negative like one of them demotes the tiles like that one only.
    assert negative_example_warnings(np.concatenate([positive, other]), positive.copy(), "max") == []


@pytest.mark.parametrize("geometry", [(557670.0, 4176095.0, 557780.0, 4176355.0), "POINT (557726.5 4176224.6)"])
def test_run_search_single_geometry_rejected(geometry, tmp_path):
    from lookalike.core.query import run_search

    with pytest.raises(SearchError, match=r"positives must be a list of geometries.*positives=\[geometry\]"):
        run_search(tmp_path / "no_index", tmp_path / "no_raster.tif", geometry)


def test_run_search_generator_rejected(tmp_path):
    from lookalike.core.query import run_search

    boxes = (box for box in [(557670.0, 4176095.0, 557780.0, 4176355.0)])
    with pytest.raises(SearchError, match=r"positives must be a list of geometries.*positives=list\(geometries\)"):
        run_search(tmp_path / "no_index", tmp_path / "no_raster.tif", boxes)


def test_moved_indexed_raster_named(shared_data, tmp_path):
    from osgeo import gdal

    from lookalike.core.errors import SearchIndexError
    from lookalike.core.pipeline import BuildParameters, build_index
    from lookalike.core.query import run_search

    raster = tmp_path / "ships.tif"
    gdal.Translate(str(raster), str(shared_data / "geo/planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    index_folder = tmp_path / "index"
    build_index(BuildParameters(source_paths=(str(raster),), index_folder=str(index_folder),
                                tile_size_source_px=64))
    moved = raster.rename(tmp_path / "ships_moved.tif")

    with pytest.raises(SearchIndexError) as raised:
        run_search(index_folder, raster, [(557670.0, 4176095.0, 557780.0, 4176355.0)])

    message = str(raised.value)
    assert f"The raster {raster}, which the index {index_folder} was built from, is not found" in message
    assert "Put it back at that path" in message
    assert moved.is_file()


def test_invalid_wkt_rejected_quietly(shared_data, tmp_path, capfd):
    from osgeo import gdal

    from lookalike.core.errors import GridError
    from lookalike.core.pipeline import BuildParameters, build_index
    from lookalike.core.query import run_search

    raster = tmp_path / "ships.tif"
    gdal.Translate(str(raster), str(shared_data / "geo/planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif"))
    build_index(BuildParameters(source_paths=(str(raster),), index_folder=str(tmp_path / "index"),
                                tile_size_source_px=64))
    capfd.readouterr()

    with pytest.raises(GridError, match="geometry 'POINT \\(bad' is not valid WKT"):
        run_search(tmp_path / "index", raster, ["POINT (bad"])

    assert "OGR Error" not in capfd.readouterr().err


def test_example_embeddings_take_query_chips():
    chips = random_unit_vectors(3, seed=21)
    query_chips = QueryChips(embeddings=chips, footprints=[(0.0, 0.0, 1.0, 1.0)] * 3, crs_wkt=UTM_WKT)

    np.testing.assert_array_equal(example_embeddings([query_chips]), example_embeddings([chips]))

