"""Retrieval metrics of the benchmarks, checked against values worked out by hand."""

import numpy as np
import pytest

from lookalike.bench.metrics import (
    average_precision,
    mean_by_label,
    precision_at_k,
    ranking_scores,
    recall_at_k,
)


def test_precision_at_k_counts_hits_in_prefix():
    assert precision_at_k([True, False, True, True], 2) == 0.5
    assert precision_at_k([True, False, True, True], 4) == 0.75


def test_precision_at_k_short_ranking_counts_misses():
    assert precision_at_k([True, True], 4) == 0.5


def test_precision_at_k_rejects_zero_k():
    with pytest.raises(ValueError, match="k must be at least 1"):
        precision_at_k([True], 0)


def test_average_precision_full_ranking():
    # Hits at ranks 1 and 3 of 3 relevant items: (1/1 + 2/3) / 3.
    assert average_precision([True, False, True, False, False], 3) == pytest.approx((1 + 2 / 3) / 3)


def test_average_precision_perfect_ranking_is_one():
    assert average_precision([True, True, True, False], 3) == pytest.approx(1.0)


def test_average_precision_cutoff_divides_by_min():
    # Cut after rank 2: one hit at rank 1, divided by min(3, 2).
    assert average_precision([True, False, True], 3, cutoff=2) == pytest.approx(0.5)
    # A perfect top-2 list scores 1 even though a third relevant item exists.
    assert average_precision([True, True, False], 3, cutoff=2) == pytest.approx(1.0)


def test_average_precision_no_relevant_items():
    assert average_precision([False, False], 0) == 0.0


def test_average_precision_rejects_too_many_hits():
    with pytest.raises(ValueError, match="relevant_total"):
        average_precision([True, True], 1)


def test_recall_at_k_mean_over_queries():
    approximate = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[1, 2, 9], [6, 5, 4]])
    # 2 of 3 found for the first query, 3 of 3 (in another order) for the second.
    assert recall_at_k(approximate, exact, 3) == pytest.approx(5 / 6)


def test_recall_at_k_uses_prefix_only():
    approximate = np.array([[1, 7, 2]])
    exact = np.array([[1, 2, 3]])
    assert recall_at_k(approximate, exact, 2) == pytest.approx(0.5)


def test_mean_by_label_groups_and_sorts():
    means = mean_by_label([1.0, 0.0, 0.5, 0.5], ["b", "a", "b", "a"])
    assert list(means) == ["a", "b"]
    assert means["a"] == pytest.approx(0.25)
    assert means["b"] == pytest.approx(0.75)


def test_ranking_scores_two_classes():
    labels = {0: "x", 1: "x", 2: "y", 3: "x"}
    precisions, average_precisions = ranking_scores([[2, 1, 3], [0, 3, 1]], [0, 2], labels, k=2)
    # Query 0 (x): ranks y, x, x -> P@2 = 1/2, AP = (1/2 + 2/3) / 2.
    assert precisions[0] == pytest.approx(0.5)
    assert average_precisions[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Query 2 (y) has no other y item: P@2 = 0 and AP = 0.
    assert precisions[1] == 0.0
    assert average_precisions[1] == 0.0


def test_ranking_scores_rejects_query_in_ranking():
    with pytest.raises(ValueError, match="own ranking"):
        ranking_scores([[0, 1]], [0], {0: "x", 1: "x"}, k=1)
