"""Retrieval metrics over ranked result lists: precision@k, average precision and recall@k.

A ranking is a sequence of item ids, best first. Relevance comes from labels: an item is
relevant to a query when it carries the query's label. The query itself must already be left out
of the ranking by the caller, because whether it counts is a property of the protocol, not of
the metric.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Mapping, Sequence

import numpy as np


def precision_at_k(relevant: Sequence[bool], k: int) -> float:
    """Return the share of the first ``k`` ranks that are relevant.

    A ranking shorter than ``k`` counts its missing ranks as not relevant, so returning fewer
    results never raises the score.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    hits = int(np.count_nonzero(np.asarray(relevant[:k], dtype=bool)))
    return hits / k


def average_precision(relevant: Sequence[bool], relevant_total: int, cutoff: int | None = None) -> float:
    """Return the average precision of one ranking.

    AP is the mean, over the relevant items, of the precision at the rank where each one appears;
    relevant items that never appear contribute 0. ``relevant_total`` is the number of relevant
    items in the whole collection (the query excluded). With ``cutoff`` the ranking is cut after
    that many ranks and the sum is divided by ``min(relevant_total, cutoff)``, which is the usual
    AP@cutoff: a perfect top-``cutoff`` list scores 1 even when more relevant items exist.
    """
    if relevant_total < 0:
        raise ValueError(f"relevant_total must be >= 0, got {relevant_total}")
    flags = np.asarray(relevant, dtype=bool)
    if cutoff is not None:
        if cutoff < 1:
            raise ValueError(f"cutoff must be at least 1, got {cutoff}")
        flags = flags[:cutoff]
    if flags.sum() > relevant_total:
        raise ValueError(
            f"the ranking contains {int(flags.sum())} relevant items but relevant_total is {relevant_total}"
        )
    denominator = relevant_total if cutoff is None else min(relevant_total, cutoff)
    if denominator == 0:
        return 0.0
    ranks = np.flatnonzero(flags) + 1
    precision_at_hits = np.arange(1, ranks.size + 1) / ranks
    return float(precision_at_hits.sum() / denominator)


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Return the mean share of each query's exact top-``k`` ids found in its approximate top-``k``.

    Both arguments are ``(queries, >= k)`` integer arrays, best first. Ties in the exact ranking
    are not resolved: an approximate result that returns a different id with the same score as
    the exact k-th one counts as a miss, so the figure is a lower bound.
    """
    approximate = np.asarray(approximate_ids)[:, :k]
    exact = np.asarray(exact_ids)[:, :k]
    if approximate.shape[0] != exact.shape[0]:
        raise ValueError(f"{approximate.shape[0]} approximate rows but {exact.shape[0]} exact rows")
    if exact.shape[1] < k:
        raise ValueError(f"the exact ranking has {exact.shape[1]} columns, fewer than k={k}")
    found = [np.intersect1d(approx_row, exact_row).size for approx_row, exact_row in zip(approximate, exact)]
    return float(np.mean(found) / k)


def mean_by_label(values: Sequence[float], labels: Sequence[Hashable]) -> dict[Hashable, float]:
    """Return the mean of ``values`` per label, in the labels' sorted order."""
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} values but {len(labels)} labels")
    groups: dict[Hashable, list[float]] = defaultdict(list)
    for value, label in zip(values, labels):
        groups[label].append(float(value))
    return {label: float(np.mean(groups[label])) for label in sorted(groups)}


def ranking_scores(
    ranked_ids: Sequence[Sequence[int]],
    query_ids: Sequence[int],
    labels: Mapping[int, Hashable],
    k: int,
    ap_cutoff: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(precision@k, AP)`` per query for rankings of labelled items.

    ``ranked_ids[i]`` is the ranking returned for item ``query_ids[i]``; the query itself and
    ids missing from ``labels`` must not be in it. The relevant total of a query is the number
    of other items with its label.
    """
    label_counts: dict[Hashable, int] = defaultdict(int)
    for label in labels.values():
        label_counts[label] += 1
    precisions = np.empty(len(query_ids))
    average_precisions = np.empty(len(query_ids))
    for position, (query_id, ranking) in enumerate(zip(query_ids, ranked_ids)):
        query_label = labels[query_id]
        if query_id in ranking:
            raise ValueError(f"query {query_id} appears in its own ranking; leave it out before scoring")
        relevant = [labels[item] == query_label for item in ranking]
        precisions[position] = precision_at_k(relevant, k)
        average_precisions[position] = average_precision(relevant, label_counts[query_label] - 1, ap_cutoff)
    return precisions, average_precisions
