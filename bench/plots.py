"""PNG figures for docs/benchmarks.md, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIGURE_DPI = 110


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def plot_throughput(results: dict[str, Any], path: Path) -> Path:
    encoders = results["encoders"]
    figure, axes = plt.subplots(figsize=(6, 3.2))
    positions = range(len(encoders))
    width = 0.38
    bare = [item["bare_tiles_per_s"] for item in encoders]
    pipeline = [item["pipeline_tiles_per_s"] for item in encoders]
    axes.bar([p - width / 2 for p in positions], bare, width, label="bare encoder (OnnxEncoder.encode)")
    axes.bar([p + width / 2 for p in positions], pipeline, width, label="pipeline (build_index)")
    for position, item in zip(positions, encoders):
        axes.text(position + width / 2, item["pipeline_tiles_per_s"], f"x{item['ratio']:.2f}", ha="center",
                  va="bottom", fontsize=9)
    axes.set_xticks(list(positions))
    axes.set_xticklabels([item["encoder"] for item in encoders])
    axes.set_ylabel("tiles/s")
    axes.set_title(f"Indexing throughput, {encoders[0]['tiles']} tiles, batch {encoders[0]['batch_size']}\n"
                   "(bars: median tiles/s; labels: median per-round ratio)", fontsize=10)
    axes.set_ylim(0, max(bare + pipeline) * 1.35)
    axes.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def plot_memory(results: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(5, 3.2))
    names = ["single", "large"]
    labels = [f"1x area\n{results['single']['tiles_embedded']} tiles",
              f"{results['area_factor']}x area\n{results['large']['tiles_embedded']} tiles"]
    before = [results[name]["peak_rss_before_build_mib"] for name in names]
    peak = [results[name]["peak_rss_mib"] for name in names]
    axes.bar(labels, before, label="before build_index (imports)")
    axes.bar(labels, [p - b for p, b in zip(peak, before)], bottom=before, label="added by build_index")
    axes.set_ylabel("peak RSS (MiB)")
    axes.set_title(f"Peak RSS per build (ratio {results['ratio']:.3f})")
    axes.set_ylim(0, max(peak) * 1.3)
    axes.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def plot_search(results: dict[str, Any], path: Path) -> Path:
    figure, (recall_axes, latency_axes) = plt.subplots(1, 2, figsize=(10, 3.6))
    for size in results["sizes"]:
        if not size.get("hnsw_built"):
            continue
        for k, marker in ((10, "o"), (100, "s")):
            points = [row for row in size["ef_sweep"] if row["k"] == k]
            recall_axes.plot([row["median_ms"] for row in points], [row["recall"] for row in points], marker=marker,
                             label=f"{size['count']:,} vectors, recall@{k}")
            for row in points:
                recall_axes.annotate(str(row["ef"]), (row["median_ms"], row["recall"]), fontsize=7,
                                     xytext=(3, -8), textcoords="offset points")
    recall_axes.axhline(0.98, color="grey", linestyle="--", linewidth=1)
    recall_axes.set_xscale("log")
    recall_axes.set_xlabel("median single-query latency (ms), labels: ef")
    recall_axes.set_ylabel("recall against exact search")
    recall_axes.set_title("HNSW recall vs latency (ef sweep)")
    recall_axes.legend(fontsize=7)

    counts = [size["count"] for size in results["sizes"]]
    latency_axes.plot(counts, [size["exact_median_ms"] for size in results["sizes"]], marker="o",
                      label="exact (exact_knn, k=10)")
    built = [size for size in results["sizes"] if size.get("hnsw_built")]
    latency_axes.plot([size["count"] for size in built], [size["hnsw_median_ms"] for size in built], marker="s",
                      label=f"HNSW (TileIndex.knn, k=10, ef={results['default_ef_search']})")
    latency_axes.set_xscale("log")
    latency_axes.set_yscale("log")
    latency_axes.set_xlabel("vectors in the collection")
    latency_axes.set_ylabel("median latency per query (ms)")
    latency_axes.set_title("Single-query latency")
    latency_axes.legend(fontsize=7)
    return _save(figure, path)


def plot_retrieval(results: dict[str, Any], path: Path) -> Path:
    methods = results["methods"]
    classes = list(methods[0]["precision_at_10_by_class"])
    height = max(3.0, 0.22 * len(classes) * len(methods) / 2 + 1.2)
    figure, axes = plt.subplots(figsize=(7, height))
    bar_height = 0.8 / len(methods)
    for position, method in enumerate(methods):
        offsets = [index + position * bar_height for index in range(len(classes))]
        axes.barh(offsets, [method["precision_at_10_by_class"][name] for name in classes], bar_height,
                  label=method["encoder"])
    axes.set_yticks([index + 0.4 - bar_height / 2 for index in range(len(classes))])
    axes.set_yticklabels(classes, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.axvline(results["chance_precision"], color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("precision@10 (dashed: chance)")
    axes.set_title(f"{results['dataset']}: precision@10 per class through build_index and search")
    axes.legend(fontsize=8, loc="upper right")
    return _save(figure, path)
