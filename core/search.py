"""Similarity search over a ``TileIndex``: combine the query, rank tiles, suppress overlaps.

Two query strategies are implemented, selected by ``strategy``:

- ``"mean"`` (default): the positives are averaged and the mean negative is subtracted,
  ``query = normalise(mean(positives) - negative_weight * mean(negatives))``, and tiles are
  ranked by cosine similarity to that one query vector. One nearest-neighbour search serves
  it, and the score is a plain cosine similarity in [-1, 1], so ``min_score`` means the same
  with and without negatives. Averaging assumes the positives show one kind of object, and
  it blurs positives that look very different from each other.
- ``"max"``: each positive is searched on its own and a tile scores
  ``max_i cos(positive_i, tile) - negative_weight * max(0, max_j cos(negative_j, tile))``.
  A tile needs to resemble only one positive, so varied examples (e.g. ships moored and under
  way) each find their own lookalikes, and a negative demotes only the tiles that resemble it
  instead of turning the whole query. Scores lie in [-1 - negative_weight, 1], and without
  negatives they are cosine similarities. It costs one search per positive plus a re-ranking.

``"mean"`` is the default because it costs one search and its score keeps one meaning. Use
``"max"`` when the positives show different kinds of the object.

An example (a drawn part, or a tile the analyst marked) can cover several query chips.
:func:`example_embeddings` turns the examples into the rows ``search`` takes: for ``"mean"`` each
example becomes the unit-length mean of its chips, so that every example counts once. Counted
chip by chip, a negative drawn over nine tiles outweighed a tile marked not relevant nine to one,
and marking a match barely moved it. Measured on the 2009 NAIP scene (bundled int8 encoder, 2,609
tiles, 12 random queries of a 300 m positive and a 460 m negative box): the match at rank 2,
marked not relevant, fell to a median rank of 5.5 counted by chip and of 145.5 by example (8 of
12 out of the top 200). For ``"max"`` every chip stays a row of its own.
``compare_query_strategies`` measures both on tiles an analyst has labelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from . import get_logger
from .errors import SearchError
from .index import TileIndex

logger = get_logger("search")

Bounds = tuple[float, float, float, float]

STRATEGIES = ("mean", "max")
DEFAULT_STRATEGY = "mean"
# Cosine similarity of the mean negative to the mean positive from which a "mean" query keeps the
# positives' direction, so that its negatives change nothing. NOTE: a judgement, not a measurement.
PARALLEL_NEGATIVES_MIN_COSINE = 0.999
# The dock's list of query parts numbers negatives the same way, so the analyst finds the one meant.
ONE_NEGATIVE_LIKE_POSITIVES_MESSAGE = (
    "Negative example {positions} of {total} (counted in the order given) looks like the positive ones to the "
    "encoder, as a negative drawn over the example itself does, so it only weakens the other negatives. Remove it: "
    "in the panel, the arrow beside Remove last part lists the parts with these numbers."
)
SEVERAL_NEGATIVES_LIKE_POSITIVES_MESSAGE = (
    "Negative examples {positions} of {total} (counted in the order given) look like the positive ones to the "
    "encoder, as a negative drawn over the example itself does, so they only weaken the other negatives. Remove "
    "them: in the panel, the arrow beside Remove last part lists the parts with these numbers."
)
NEGATIVES_ONLY_SCALE_SCORES_MESSAGE = (
    "The negative examples look like the positive one to the encoder, so with the max strategy they lower every "
    "positive score in proportion (to about half with the default negative weight) and leave the ranking as it "
    "is. Draw negatives over what the matches should not look like, not over the example itself."
)
NEGATIVES_WITHOUT_EFFECT_MESSAGE = (
    "The negative examples look like the positive ones to the encoder, so they change nothing in the averaged "
    "query; draw negatives over what the matches should not look like, not over the examples themselves."
)
# Half weight lets a negative push down tiles that resemble it without letting a negative
# that also resembles the positives cancel the query. NOTE: not yet tuned on real data.
DEFAULT_NEGATIVE_WEIGHT = 0.5
# At 0.25, diagonal neighbours on a 50 % overlap grid both come back, so one object can appear
# twice. 0.0 (only edge-sharing matches) gives distinct places, but on the shipped demo it keeps a
# tile over part of the south ship and drops the tile over its centre, so the demo ship test
# (ship centre inside a top-5 match) fails for the north-centre query.
# TODO: lower the default once the demo check measures "object found" by overlap, not by centre.
DEFAULT_MAX_OVERLAP = 0.25
# Slack on max_overlap, so that rounding in grid coordinates does not decide whether a tile that
# shares exactly the threshold (e.g. a quarter for diagonal neighbours at 50 % tile overlap, or
# only an edge at 0.0) passes.
OVERLAP_TOLERANCE = 1e-9
# A tile is dropped as the query itself when it shares more than this fraction with a query
# footprint, whatever the value of max_overlap. The slack absorbs the millimetres that a footprint gains
# when it is reprojected, so that tiles which only share an edge with the query stay.
QUERY_OVERLAP_TOLERANCE = 1e-3

# With 50 % tile overlap one object appears in about four tiles, and suppression keeps one of
# them, so the first round requests four candidates per match.
INITIAL_CANDIDATES_PER_MATCH = 4

# Rows per block when scoring candidates from the stored embeddings: 80 MiB of float64 at 1280 dims.
SCORING_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class Match:
    """One search result.

    ``score`` is the strategy's score (see the module docstring). ``bounds`` are
    ``(xmin, ymin, xmax, ymax)`` in ``crs_wkt``, the CRS of the source's tile grid.
    """

    rank: int
    score: float
    tile_id: int
    source_id: int
    row: int
    col: int
    bounds: Bounds
    crs_wkt: str
    source_path: str


def matches_for_tiles(index: TileIndex, ranked_tiles: Iterable[tuple[int, int, float]]) -> list[Match]:
    """Return the ``Match`` of each ``(rank, tile_id, score)`` of ``index``, e.g. to restore saved results."""
    footprints = _FootprintIndex(index)
    return [footprints.match(rank, tile_id, score) for rank, tile_id, score in ranked_tiles]


def search(
    index: TileIndex,
    positives: np.ndarray,
    negatives: Optional[np.ndarray] = None,
    k: int = 10,
    exclude: Sequence[tuple[Sequence[float], str]] = (),
    max_overlap: float = DEFAULT_MAX_OVERLAP,
    min_score: Optional[float] = None,
    strategy: str = DEFAULT_STRATEGY,
    negative_weight: float = DEFAULT_NEGATIVE_WEIGHT,
    ef: Optional[int] = None,
) -> list[Match]:
    """Return up to k matches for the query, best first.

    ``positives`` ``(p, dim)`` and ``negatives`` ``(m, dim)`` are embeddings of query chips (a
    single vector may be passed as ``(dim,)``). ``exclude`` lists query footprints as
    ``(bounds, crs_wkt)``; a tile that overlaps one of them is always dropped, because it shows
    the query itself (tiles sharing only an edge with it stay). ``max_overlap`` is only about
    matches overlapping each other: a tile is dropped when it overlaps a better-ranked match by
    more than ``max_overlap``, measured as the intersection area over the smaller of the two
    areas. That measure counts a small tile inside a large footprint as fully overlapping, where
    IoU would not. With tiles at 50 % overlap, the default 0.25 keeps diagonal neighbours
    (exactly 0.25) and drops side neighbours (0.5). Pass 0.0 to keep only matches that share at
    most an edge, so each is a distinct place. ``max_overlap=1`` turns suppression between matches off.
    Tiles scoring below ``min_score`` are dropped.

    When suppression leaves fewer than k matches, the candidate set doubles until k matches
    survive or the index is exhausted, so fewer than k matches come back only when the index
    (after suppression and ``min_score``) has fewer. An empty index returns ``[]`` and logs a
    warning, because an index whose tiles were all skipped as blank is a valid outcome of a build.
    Ties are ordered by tile id, so duplicate tiles rank stably.

    Raises:
        SearchError: on a blank (all-zero) or non-finite query embedding, a dimension other
            than the index's, negatives that cancel the positives, or an invalid parameter.
    """
    _check_parameters(k, max_overlap, strategy, negative_weight, min_score)
    positive_matrix = _as_embeddings(positives, index.embedding_dim, "positive")
    negative_matrix = (
        np.empty((0, index.embedding_dim), dtype=np.float32)
        if negatives is None
        else _as_embeddings(negatives, index.embedding_dim, "negative", allow_empty=True)
    )
    if positive_matrix.shape[0] == 0:
        raise SearchError("no positive embeddings were given; pass at least one query chip embedding")

    if index.count == 0:
        logger.warning("index %s is empty; search returns no matches", index.folder)
        return []

    if strategy == "mean":
        scorer: _Scorer = _MeanScorer(index, positive_matrix, negative_matrix, negative_weight, ef)
    else:
        scorer = _MaxScorer(index, positive_matrix, negative_matrix, negative_weight, ef)
    footprints = _FootprintIndex(index)
    excluded = _excluded_footprints(exclude)

    n_candidates = min(index.count, INITIAL_CANDIDATES_PER_MATCH * k)
    while True:
        candidate_ids, scores, score_bound = scorer.rank(n_candidates)
        exhausted = n_candidates >= index.count
        # Tiles outside the candidate set score at most score_bound. Only candidates at or above
        # it are therefore in their final order, and the rest wait for a wider round.
        usable_down_to = -math.inf if exhausted else score_bound
        survivors = _suppress(footprints, candidate_ids, scores, k, excluded, max_overlap, min_score, usable_down_to)
        nothing_better_left = min_score is not None and score_bound < min_score
        if len(survivors) >= k or exhausted or nothing_better_left:
            break
        logger.debug("%d of %d matches after %d candidates; widening", len(survivors), k, n_candidates)
        n_candidates = min(index.count, 2 * n_candidates)

    if not survivors and exhausted and min_score is None:
        # The best candidate survives suppression between matches, so only the query's own
        # footprints can have removed every tile. The dock and Processing explain an empty result
        # themselves, so this warning is for callers of the engine.
        logger.warning(
            "No match: every one of the index's %d tiles overlaps the query, and tiles under the query are never "
            "matches; draw the example over a smaller area, around one object", index.count,
        )
    return [footprints.match(rank, tile_id, score) for rank, (tile_id, score) in enumerate(survivors, start=1)]


def example_embeddings(examples: Sequence[np.ndarray], strategy: str = DEFAULT_STRATEGY) -> np.ndarray:
    """Return the query rows for ``examples``, each an ``(n_i, dim)`` array of one example's chip embeddings.

    An example may also be the ``QueryChips`` that ``embed_query`` returns, whose embeddings are
    taken. With ``"mean"`` each example gives one row, the unit-length mean of its chips; with
    ``"max"`` every chip is a row. No examples give an empty ``(0, 0)`` array.
    """
    # QueryChips lives in core.query, which imports this module, so it is recognised by its field.
    arrays = [getattr(example, "embeddings", example) for example in examples]
    blocks = [np.asarray(example, dtype=np.float32).reshape(-1, np.shape(example)[-1]) for example in arrays
              if np.size(example)]
    if not blocks:
        return np.empty((0, 0), dtype=np.float32)
    if strategy != "mean":
        return np.concatenate(blocks)
    means = np.stack([block.mean(axis=0) for block in blocks])
    lengths = np.linalg.norm(means, axis=1, keepdims=True)
    # A zero mean (chips that cancel out) stays zero, for search() to reject with its message.
    return np.divide(means, lengths, out=np.zeros_like(means), where=lengths > 0)


def compare_query_strategies(
    index: TileIndex,
    positives: np.ndarray,
    negatives: Optional[np.ndarray],
    relevant_tile_ids: Iterable[int],
    k: int = 10,
    **search_options: Any,
) -> dict[str, float]:
    """Return precision@k of each strategy: the fraction of the k matches that are relevant.

    ``relevant_tile_ids`` are the tiles an analyst labelled as true lookalikes. Other keyword
    arguments go to ``search``.
    """
    relevant = {int(tile_id) for tile_id in relevant_tile_ids}
    precision_by_strategy = {}
    for strategy in STRATEGIES:
        matches = search(index, positives, negatives, k=k, strategy=strategy, **search_options)
        hits = sum(1 for match in matches if match.tile_id in relevant)
        precision_by_strategy[strategy] = hits / k
    return precision_by_strategy


# -- query preparation --------------------------------------------------------------------------


def negative_example_warnings(
    positives: np.ndarray, negatives: Optional[np.ndarray], strategy: str = DEFAULT_STRATEGY
) -> list[str]:
    """Return the warnings for negative examples that look like the positives, for the dock and Processing.

    ``positives`` and ``negatives`` are rows from :func:`example_embeddings` with the mean strategy.
    """
    if negatives_without_effect(positives, negatives, strategy):
        return [NEGATIVES_WITHOUT_EFFECT_MESSAGE]
    if negatives_only_scale_scores(positives, negatives, strategy):
        return [NEGATIVES_ONLY_SCALE_SCORES_MESSAGE]
    if strategy == "mean" and negatives is not None and len(negatives) > 1:
        positions = [str(row + 1) for row in negative_rows_like_positives(positives, negatives)]
        if len(positions) == 1:
            return [ONE_NEGATIVE_LIKE_POSITIVES_MESSAGE.format(positions=positions[0], total=len(negatives))]
        if positions:
            listed = ", ".join(positions[:-1]) + " and " + positions[-1]
            return [SEVERAL_NEGATIVES_LIKE_POSITIVES_MESSAGE.format(positions=listed, total=len(negatives))]
    return []


def negatives_like_positives(positives: np.ndarray, negatives: Optional[np.ndarray]) -> int:
    """Return how many negative rows point the way of the positives' mean, as one drawn over the example does.

    Among other negatives such a row does change the query, because averaged in it weakens the
    others. ``negatives_without_effect`` covers a lone one.
    """
    return len(negative_rows_like_positives(positives, negatives))


def negative_rows_like_positives(positives: np.ndarray, negatives: Optional[np.ndarray]) -> list[int]:
    """Return the positions of the negative rows that point the way of the positives' mean."""
    if negatives is None or not len(negatives) or not len(positives):
        return []
    positive_mean = np.asarray(positives, dtype=np.float64).mean(axis=0)
    rows = np.asarray(negatives, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(positive_mean)
    cosines = np.divide(rows @ positive_mean, norms, out=np.zeros(len(rows)), where=norms > 0)
    return [int(row) for row in np.flatnonzero(cosines >= PARALLEL_NEGATIVES_MIN_COSINE)]


def negatives_without_effect(
    positives: np.ndarray, negatives: Optional[np.ndarray], strategy: str = DEFAULT_STRATEGY
) -> bool:
    """Tell whether the negatives leave a query unchanged: in "mean", their mean points the way of the positives'.

    ``normalise(p - w * n)`` is ``normalise(p)`` whenever ``n`` is parallel to ``p``, as for a
    negative drawn over the positive example itself.
    """
    if strategy != "mean" or negatives is None or not len(negatives) or not len(positives):
        return False
    positive_mean = np.asarray(positives, dtype=np.float64).mean(axis=0)
    negative_mean = np.asarray(negatives, dtype=np.float64).mean(axis=0)
    norms = float(np.linalg.norm(positive_mean) * np.linalg.norm(negative_mean))
    return norms > 0 and float(positive_mean @ negative_mean) / norms >= PARALLEL_NEGATIVES_MIN_COSINE


def negatives_only_scale_scores(
    positives: np.ndarray, negatives: Optional[np.ndarray], strategy: str = DEFAULT_STRATEGY
) -> bool:
    """Tell whether, in "max", every negative points the way of the single positive row.

    Each score is then ``c - w * max(0, c')`` with ``c'`` about ``c``: the scores shrink by the
    negative weight, so the ranking stays and only a minimum score keeps fewer matches.
    """
    if strategy != "max" or negatives is None or not len(negatives) or len(positives) != 1:
        return False
    return negatives_like_positives(positives, negatives) == len(negatives)


def _check_parameters(k: int, max_overlap: float, strategy: str, negative_weight: float,
                      min_score: Optional[float] = None) -> None:
    # Scores fall below -1 only with negatives and the max strategy, so only the upper end is fixed.
    if min_score is not None and not (isinstance(min_score, (int, float)) and not isinstance(min_score, bool)
                                      and math.isfinite(min_score) and min_score <= 1.0):
        raise SearchError(
            f"min_score {min_score!r} is not a number up to 1; no score exceeds 1 (identical embeddings), so "
            "pass a number up to 1, or leave min_score unset for no minimum"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"k {k!r} is invalid; pass the number of matches as a positive integer")
    if not (isinstance(max_overlap, (int, float)) and 0.0 <= max_overlap <= 1.0):
        raise SearchError(
            f"max_overlap {max_overlap!r} is out of range; pass a fraction in [0, 1] (1 keeps overlapping matches)"
        )
    if strategy not in STRATEGIES:
        raise SearchError(f"strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if not (isinstance(negative_weight, (int, float)) and math.isfinite(negative_weight) and negative_weight >= 0):
        raise SearchError(f"negative_weight {negative_weight!r} is invalid; pass a finite value >= 0")


def _as_embeddings(vectors: np.ndarray, embedding_dim: int, role: str, allow_empty: bool = False) -> np.ndarray:
    """Check query embeddings and return them L2-normalised as float32 ``(n, dim)``."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if allow_empty and matrix.size == 0:
        return np.empty((0, embedding_dim), dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != embedding_dim:
        raise SearchError(
            f"{role} embeddings have shape {np.shape(vectors)} but the index contains {embedding_dim}-dim "
            "embeddings; embed the query with the encoder that built the index"
        )
    if not np.isfinite(matrix).all():
        raise SearchError(f"a {role} embedding contains NaN or infinity; check the query area for nodata values")
    # float64 because the squares of large float32 values overflow, which would scale them to zero.
    wide = matrix.astype(np.float64)
    norms = np.linalg.norm(wide, axis=1)
    blank = np.flatnonzero(norms == 0)
    if blank.size:
        raise SearchError(
            f"{role} embedding {int(blank[0])} is all zeros, so its query area is blank or nodata; draw "
            "the query over imagery with content"
        )
    return (wide / norms[:, None]).astype(np.float32)


# -- ranking ------------------------------------------------------------------------------------


class _Scorer:
    """Ranks candidate tiles for one query.

    ``rank(n)`` returns ``(tile_ids, scores, score_bound)`` ordered by score then tile id, where
    every tile outside ``tile_ids`` scores at most ``score_bound`` (up to HNSW recall).
    """

    def rank(self, n_candidates: int) -> tuple[np.ndarray, np.ndarray, float]:
        raise NotImplementedError


class _MeanScorer(_Scorer):
    def __init__(
        self, index: TileIndex, positives: np.ndarray, negatives: np.ndarray, negative_weight: float, ef: Optional[int]
    ) -> None:
        query = positives.mean(axis=0)
        if negatives.shape[0]:
            query = query - negative_weight * negatives.mean(axis=0)
        norm = float(np.linalg.norm(query))
        # Opposite positives, or negatives equal to the positives at weight 1, leave no direction.
        if norm < 1e-6:
            raise SearchError(
                "the positives and negatives cancel out, so the query has no direction; remove negatives "
                "that look like the positives, lower negative_weight, or use strategy='max'"
            )
        self._index = index
        self._query = (query / norm)[None, :].astype(np.float32)
        self._ef = ef

    def rank(self, n_candidates: int) -> tuple[np.ndarray, np.ndarray, float]:
        tile_ids, similarities = self._index.knn(self._query, n_candidates, ef=self._ef)
        tile_ids = tile_ids[0]
        similarities = similarities[0]
        # hnswlib does not promise an order for equal distances, so duplicates are re-sorted by tile id.
        order = np.lexsort((tile_ids, -similarities))
        tile_ids = tile_ids[order]
        similarities = similarities[order]
        score_bound = float(similarities[-1]) if similarities.size else -math.inf
        return tile_ids, similarities, score_bound


class _MaxScorer(_Scorer):
    def __init__(
        self, index: TileIndex, positives: np.ndarray, negatives: np.ndarray, negative_weight: float, ef: Optional[int]
    ) -> None:
        self._index = index
        self._positives = positives.astype(np.float64)
        self._negatives = negatives.astype(np.float64)
        self._negative_weight = float(negative_weight)
        self._ef = ef

    def rank(self, n_candidates: int) -> tuple[np.ndarray, np.ndarray, float]:
        neighbour_ids, neighbour_similarities = self._index.knn(self._positives, n_candidates, ef=self._ef)
        candidate_ids = np.unique(neighbour_ids)
        scores = self._score(candidate_ids)
        order = np.lexsort((candidate_ids, -scores))

        # A tile missing from positive i's neighbours is at most as similar to it as the last
        # neighbour. An unseen tile therefore scores at most the largest of these last
        # similarities, and the clipped penalty only lowers its score.
        truncated = neighbour_ids.shape[1] < self._index.count
        score_bound = float(neighbour_similarities[:, -1].max()) if truncated else -math.inf
        return candidate_ids[order], scores[order], score_bound

    def _score(self, tile_ids: np.ndarray) -> np.ndarray:
        embeddings = self._index.embeddings
        scores = np.empty(tile_ids.size, dtype=np.float32)
        for block_start in range(0, tile_ids.size, SCORING_BLOCK_ROWS):
            block_ids = tile_ids[block_start : block_start + SCORING_BLOCK_ROWS]
            # float64 products rounded to float32 give identical tiles identical scores (see
            # exact_knn), so duplicates keep their tile-id order.
            vectors = np.asarray(embeddings[block_ids], dtype=np.float64)
            block_scores = (vectors @ self._positives.T).max(axis=1)
            if self._negatives.shape[0]:
                negative_similarity = (vectors @ self._negatives.T).max(axis=1)
                block_scores = block_scores - self._negative_weight * np.maximum(negative_similarity, 0.0)
            scores[block_start : block_start + block_ids.size] = block_scores.astype(np.float32)
        return scores


# -- overlap suppression ------------------------------------------------------------------------


def _excluded_footprints(exclude: Sequence[tuple[Sequence[float], str]]) -> list[tuple[Bounds, str]]:
    """Return ``exclude`` as ``((xmin, ymin, xmax, ymax), crs_wkt)`` pairs; raise SearchError for another shape."""
    excluded = []
    for position, item in enumerate(exclude):
        try:
            bounds, crs_wkt = item
            bounds = tuple(float(value) for value in bounds)
            valid = len(bounds) == 4 and isinstance(crs_wkt, str)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise SearchError(
                f"exclude item {position} {item!r} is not a footprint; pass each as ((xmin, ymin, xmax, ymax), crs_wkt)"
            )
        excluded.append((bounds, crs_wkt))
    return excluded


def _suppress(
    footprints: _FootprintIndex,
    candidate_ids: np.ndarray,
    scores: np.ndarray,
    k: int,
    excluded: list[tuple[Bounds, str]],
    max_overlap: float,
    min_score: Optional[float],
    usable_down_to: float,
) -> list[tuple[int, float]]:
    """Walk the ranked candidates and keep those that overlap no exclusion and no kept match."""
    survivors: list[tuple[int, float]] = []
    kept_footprints: list[tuple[Bounds, str]] = []
    for tile_id, score in zip(candidate_ids.tolist(), scores.tolist()):
        if len(survivors) >= k or score < usable_down_to:
            break
        if min_score is not None and score < min_score:
            break
        bounds, crs_wkt = footprints.bounds(tile_id)
        if footprints.overlaps_any(bounds, crs_wkt, excluded, QUERY_OVERLAP_TOLERANCE):
            continue
        # No overlap fraction exceeds 1, so at max_overlap 1 matches are not compared with each other.
        if max_overlap < 1.0 and footprints.overlaps_any(bounds, crs_wkt, kept_footprints, max_overlap):
            continue
        survivors.append((tile_id, score))
        kept_footprints.append((bounds, crs_wkt))
    return survivors


def overlap_fraction(first: Bounds, second: Bounds) -> float:
    """Return the intersection area over the smaller box's area, in [0, 1].

    A box of zero area (a point or a line) counts as fully overlapping when it touches the other.
    """
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    smaller_area = min(_area(first), _area(second))
    if smaller_area <= 0:
        return 1.0 if width >= 0 and height >= 0 else 0.0
    if width <= 0 or height <= 0:
        return 0.0
    return min(1.0, width * height / smaller_area)


def _area(bounds: Bounds) -> float:
    return max(0.0, bounds[2] - bounds[0]) * max(0.0, bounds[3] - bounds[1])


class _FootprintIndex:
    """Tile footprints and cross-CRS overlap tests for one search, with per-search caches."""

    def __init__(self, index: TileIndex) -> None:
        self._index = index
        self._tile_table = index.tile_table
        self._sources = index.sources
        self._same_crs: dict[tuple[str, str], bool] = {}
        self._transforms: dict[tuple[str, str], Any] = {}
        # Each kept match and excluded footprint is compared with every later candidate, but
        # candidates come in a few grid CRSs only, so its transformed bounds are kept.
        self._transformed_bounds: dict[tuple[Bounds, str, str], Bounds] = {}

    def bounds(self, tile_id: int) -> tuple[Bounds, str]:
        return self._index.tile_bounds(tile_id), self._index.tile_crs_wkt(tile_id)

    def match(self, rank: int, tile_id: int, score: float) -> Match:
        tile = self._tile_table[tile_id]
        source_id = int(tile["source_id"])
        bounds, crs_wkt = self.bounds(tile_id)
        return Match(
            rank=rank,
            score=float(score),
            tile_id=int(tile_id),
            source_id=source_id,
            row=int(tile["row"]),
            col=int(tile["col"]),
            bounds=bounds,
            crs_wkt=crs_wkt,
            source_path=str(self._sources[source_id]["path"]),
        )

    def overlaps_any(self, bounds: Bounds, crs_wkt: str, others: list[tuple[Bounds, str]], max_overlap: float) -> bool:
        for other_bounds, other_crs_wkt in others:
            in_tile_crs = self._to_crs(other_bounds, other_crs_wkt, crs_wkt)
            if overlap_fraction(bounds, in_tile_crs) > max_overlap + OVERLAP_TOLERANCE:
                return True
        return False

    def _to_crs(self, bounds: Bounds, from_wkt: str, to_wkt: str) -> Bounds:
        if self._is_same_crs(from_wkt, to_wkt):
            return bounds
        cached = self._transformed_bounds.get((bounds, from_wkt, to_wkt))
        if cached is not None:
            return cached
        key = (from_wkt, to_wkt)
        if key not in self._transforms:
            self._transforms[key] = _make_transform(from_wkt, to_wkt)
        xmin, ymin, xmax, ymax = self._transforms[key].TransformBounds(*bounds, 21)
        self._transformed_bounds[(bounds, from_wkt, to_wkt)] = (xmin, ymin, xmax, ymax)
        return xmin, ymin, xmax, ymax

    def _is_same_crs(self, first_wkt: str, second_wkt: str) -> bool:
        if first_wkt == second_wkt:
            return True
        key = (first_wkt, second_wkt)
        if key not in self._same_crs:
            first, second = _spatial_reference(first_wkt), _spatial_reference(second_wkt)
            self._same_crs[key] = bool(first.IsSame(second))
        return self._same_crs[key]


def _spatial_reference(crs_wkt: str) -> Any:
    # Imported here so that searches within one CRS do not need GDAL.
    from .crs import spatial_reference

    return spatial_reference(crs_wkt, SearchError)


def _make_transform(from_wkt: str, to_wkt: str) -> Any:
    from osgeo import osr

    return osr.CoordinateTransformation(_spatial_reference(from_wkt), _spatial_reference(to_wkt))
