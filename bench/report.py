"""Write docs/benchmarks.md from the results of one run (and, when present, the previous full run)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .common import DOCS_DIR, IMAGE_DIR
from .search_bench import hnsw_build_estimate_s

ENCODER_PAGE = DOCS_DIR / "benchmarks-encoder.md"
THROUGHPUT_GOAL = 0.9
MEMORY_GOAL = 1.1
RECALL_GOAL = 0.98
MILLION = 1_000_000


def _number(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _met(passed: bool) -> str:
    return "yes" if passed else "**no**"


def _throughput_verdict(round_ratios: list[float]) -> str:
    """Return whether the throughput goal is met, or unclear when the rounds fall on both sides of it.

    The median alone would call a run met or missed that a drift in machine speed between rounds decided.
    """
    if all(ratio >= THROUGHPUT_GOAL for ratio in round_ratios):
        return "yes"
    if all(ratio < THROUGHPUT_GOAL for ratio in round_ratios):
        return "**no**"
    return f"**unclear**: rounds {min(round_ratios):.2f} to {max(round_ratios):.2f} lie on both sides"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _image(name: str) -> str:
    return f"![{name}](img/{name}.png)"


def _machine_section(machine: dict[str, Any]) -> list[str]:
    rows = [
        ["CPU", f"{machine['cpu_model']}, {machine['logical_cpus']} logical CPUs ({machine['usable_cpus']} usable)"],
        ["memory", f"{machine['memory_gib']} GiB"],
        ["OS", f"{machine['os']} (kernel {machine['kernel']})"],
        ["Python", machine["python"]],
        ["numpy / GDAL", f"{machine['numpy']} / {machine['gdal']}"],
        ["onnxruntime / hnswlib", f"{machine['onnxruntime']} / {machine['hnswlib']}"],
        ["OPENBLAS_CORETYPE", machine["openblas_coretype"] or "(unset)"],
        ["git commit", f"`{machine['git_commit']}`"
         + (" with uncommitted changes" if machine.get("git_tracked_files_modified") else "")],
    ]
    return ["## Machine", ""] + _table(["", ""], rows)


def _goal_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    throughput = results.get("throughput")
    if throughput:
        for item in throughput["encoders"]:
            rows.append([f"indexing throughput, {item['encoder']}: build_index / OnnxEncoder.encode tiles/s",
                         f">= {THROUGHPUT_GOAL}", _number(item["ratio"]), _throughput_verdict(item["ratios"])])
        spare = throughput.get("spare_core")
        if spare:
            rows.append([f"indexing throughput, {spare['encoder']} on {spare['encoder_threads']} onnxruntime "
                         f"thread(s) of {spare['cpu_count']} CPUs (a core left to the reader)",
                         "none set (informative; same measure as above)", _number(spare["ratio"]), "–"])
    memory = results.get("memory")
    if memory:
        rows.append([f"peak RSS, build over {memory['area_factor']}x area / build over 1x area",
                     f"<= {MEMORY_GOAL}", _number(memory["ratio"]), _met(memory["ratio"] <= MEMORY_GOAL)])
    search = results.get("search")
    if search:
        for size in search["sizes"]:
            if size.get("hnsw_built"):
                recall = size["recall_at_10_default_ef"]
                rows.append([f"HNSW recall@10 against exact search, {size['count']:,} vectors, default ef",
                             f">= {RECALL_GOAL}", _number(recall, 4), _met(recall >= RECALL_GOAL)])
    for dataset in results.get("retrieval", []):
        baseline, *encoders = dataset["methods"]
        for method in encoders:
            rows.append([f"{dataset['dataset']} precision@10, {method['encoder']} / colour histogram",
                         "none set (> 1 means the encoder beats the baseline)",
                         f"{method['precision_at_10'] / baseline['precision_at_10']:.2f}", "–"])
        if len(encoders) > 1:
            rows.append([f"{dataset['dataset']} precision@10, {encoders[1]['encoder']} / {encoders[0]['encoder']}",
                         "none set (1 means no loss)",
                         f"{encoders[1]['precision_at_10'] / encoders[0]['precision_at_10']:.3f}", "–"])
    return rows


def _extent_words(throughput: dict[str, Any]) -> str:
    side = throughput.get("tiles_per_side")
    if side is None:
        return "the whole scene"
    return f"the top-left {side} x {side} tile footprints"


def _throughput_section(throughput: dict[str, Any]) -> list[str]:
    first = throughput["encoders"][0]
    lines = [
        "## 1. Indexing throughput",
        "",
        f"Raster: `{throughput['raster']}` (NAIP, 934 x 723 px at 5 m, 4 bands, RGB read), "
        f"{_extent_words(throughput)} in tiles of {first['tile_ground_size_m']:g} m with "
        f"{throughput.get('overlap_fraction', 0.0):.0%} overlap ({first['tiles']} tiles, each upsampled to 224 px). "
        f"Batch size {first['batch_size']}. Pipeline: wall time of the whole `build_index` call (encoder load, grid "
        "and stretch planning, the reader thread's reads, encoding, one checkpoint file per batch, HNSW commit "
        "and atomic save). Bare encoder: `OnnxEncoder.encode`, one batch at a time, on the same chips, read "
        "beforehand with the index's grid and stretch. The pipeline opens its encoder with onnxruntime's idle "
        "threads sleeping instead of spinning, because other threads of the build need the cores, except for a "
        "quantized model on an x86 CPU without VNNI, where spinning measured faster (`_encoder_should_spin` in "
        "`core/pipeline.py`). The bare encoder keeps onnxruntime's default, spinning, which is its faster "
        "setting when it runs alone. "
        f"The two alternate, {throughput['rounds']} round(s) each. The bare encoder runs first in odd rounds and "
        "the pipeline first in even ones, so that a machine that slows down or speeds up steadily favours neither. "
        "The ratio is the median of the per-round ratios. Goal: ratio >= 0.9.",
        "",
    ]
    rows = []
    for item in throughput["encoders"]:
        rows.append([
            item["encoder"], item["tiles"], _number(item["bare_tiles_per_s"], 1),
            _number(item["pipeline_tiles_per_s"], 1),
            f"**{item['ratio']:.3f}**", ", ".join(f"{ratio:.2f}" for ratio in item["ratios"]),
            f"{_number(item.get('bare_cpu_ms_per_tile'), 1)} / {_number(item.get('pipeline_cpu_ms_per_tile'), 1)}",
            _number(item.get("cpu_ratio")), _number(item.get("encoder_open_s"), 2),
            _number(item["read_only_tiles_per_s"], 1), f"{item['max_abs_difference_to_index']:.1e}",
        ])
    lines += _table(["encoder", "tiles", "bare encoder tiles/s", "pipeline tiles/s", "ratio (wall time)",
                     "ratio per round", "CPU ms per tile, bare / pipeline", "ratio (CPU time)",
                     "opening the encoder, s (once per build)", "chip reads alone, tiles/s (one thread)",
                     "max abs diff, bare vs indexed embedding"], rows)
    extra_cpu = ", ".join(
        f"{item['pipeline_cpu_ms_per_tile'] - item['bare_cpu_ms_per_tile']:.1f} ms ({item['encoder']})"
        for item in throughput["encoders"] if item.get("pipeline_cpu_ms_per_tile") is not None
    )
    lines += [
        "Wall time is what the goal is about. CPU time counts every thread of the benchmark process and is "
        "barely changed by other processes on the machine, so the CPU-time ratio (bare CPU ms per tile over "
        "pipeline CPU ms per tile) shows how much extra work the pipeline does per tile; a wall-time ratio "
        "well below the CPU-time ratio means the pipeline waits rather than works.",
        "",
        "The bare encoder can keep every core busy: its CPU ms per tile is then about the core count times its "
        "wall ms per tile. The pipeline's own work per tile (reading and interpolating chips, the nodata check, "
        "checkpoints, HNSW inserts) then has no idle core to run on, so it adds its CPU time divided by the core "
        "count to every tile. The CPU-time ratio is then about the best wall-time ratio the machine allows. The "
        "goal of 0.9 thus needs the pipeline's added work to stay below a ninth of the encoder's. The pipeline "
        f"added {extra_cpu} of CPU per tile in this run.",
        "",
        "The last column compares the bare encoder's embeddings with those stored in the index (float16), which "
        "shows that both paths embedded the same chips.",
        "",
    ]
    lines += _spare_core_lines(throughput.get("spare_core"))
    lines += [_image("bench_throughput"), ""]
    return lines


def _spare_core_lines(spare: Optional[dict[str, Any]]) -> list[str]:
    """Describe the run with onnxruntime on one thread fewer than the CPUs; informative, not the goal."""
    if not spare:
        return []
    threads = spare["encoder_threads"]
    lines = [
        f"With a core left to the reader (not the goal): the engine's default encoder ({spare['encoder']}) again, "
        f"with onnxruntime limited to {threads} thread(s) of the {spare['cpu_count']} CPUs, bare and in the "
        "pipeline (`BuildParameters.encoder_threads`). The reader thread and the HNSW inserts then have a core "
        "of their own, as on a machine with more cores than onnxruntime keeps busy. This shows how much of the "
        "gap above is the machine's CPU count rather than the pipeline waiting.",
        "",
    ]
    lines += _table(
        ["encoder", "onnxruntime threads", "bare encoder tiles/s", "pipeline tiles/s", "ratio (wall time)",
         "ratio per round", "CPU ms per tile, bare / pipeline"],
        [[spare["encoder"], threads, _number(spare["bare_tiles_per_s"], 1), _number(spare["pipeline_tiles_per_s"], 1),
          f"**{spare['ratio']:.3f}**", ", ".join(f"{ratio:.2f}" for ratio in spare["ratios"]),
          f"{_number(spare['bare_cpu_ms_per_tile'], 1)} / {_number(spare['pipeline_cpu_ms_per_tile'], 1)}"]],
    )
    return lines


def _memory_section(memory: dict[str, Any]) -> list[str]:
    single, large = memory["single"], memory["large"]
    lines = [
        "## 2. Memory",
        "",
        f"Both builds read tiled, DEFLATE-compressed GeoTIFFs written from `{memory['raster']}`: one copy, and "
        f"{int(memory['area_factor'] ** 0.5)} x {int(memory['area_factor'] ** 0.5)} copies placed edge to edge "
        f"({memory['area_factor']}x the area). "
        f"Tile size {memory['tile_size_source_px']:g} source px, no overlap, default batch size, encoder "
        f"`{memory.get('encoder_file', 'default')}` (the engine's default). Each build runs in a fresh process "
        "(`bench/memory_worker.py`) that reports `ru_maxrss` after importing numpy, GDAL, onnxruntime and hnswlib, "
        "and again after `build_index`. The worker is started through `sh`, which forks it, because Linux copies "
        "the peak RSS of a process that starts a child with vfork (as Python's subprocess does) into the child's "
        "`ru_maxrss`; the worker also reports VmHWM from /proc as a cross-check. Goal: ratio <= 1.1.",
        "",
    ]
    rows = []
    named_builds = [("1x area", single), (f"{memory['area_factor']}x area", large)]
    if memory.get("large_vrt"):
        named_builds.append((f"{memory['area_factor']}x area, VRT of {memory['large_vrt_files']} files (not the goal)",
                             memory["large_vrt"]))
    for name, build in named_builds:
        rows.append([name, build["tiles_embedded"], _number(build["peak_rss_before_build_mib"], 0),
                     _number(build["peak_rss_mib"], 0), f"{build['index_bytes'] / 2**20:.1f}",
                     build["peak_batches_in_memory"], _number(build["elapsed_s"], 1)])
    lines += _table(["raster", "tiles", "peak RSS before build (MiB)", "peak RSS after build (MiB)",
                     "index on disk (MiB)", "peak chip batches in memory",
                     "build s"], rows)
    hwm_gap = max(abs(build.get("vm_hwm_mib", build["peak_rss_mib"]) - build["peak_rss_mib"])
                  for _, build in named_builds)
    lines += [
        f"VmHWM differs from `ru_maxrss` by at most {hwm_gap:.1f} MiB in every build.",
        "",
        f"Ratio of peak RSS, {memory['area_factor']}x / 1x: **{memory['ratio']:.3f}**. The chip batches in flight are "
        "bounded by `prefetch_batches + 1` and their arrays are reused. GDAL keeps every block it decodes in its "
        "cache (`GDAL_CACHEMAX`, 5 % of RAM by default), which would grow with the area read. The reader therefore "
        "drops its dataset's cached blocks each time the tiles have moved one block height down. What still grows "
        "with the tile count is the index, which `TileIndex` holds in memory while it commits (hnswlib keeps a "
        "float32 copy of each vector plus its links); the index size on disk above is about that part.",
        "",
    ]
    if memory.get("large_vrt"):
        vrt = memory["large_vrt"]
        extra_mib = vrt["peak_rss_mib"] - large["peak_rss_mib"]
        lines += [
            f"The same {memory['area_factor']}x mosaic read as a VRT of {memory['large_vrt_files']} files peaks "
            f"{extra_mib:.0f} MiB higher ({vrt['peak_rss_mib'] / single['peak_rss_mib']:.3f} x the 1x build). GDAL "
            "keeps every file of a VRT that it has read open, with that file's decoding buffers, up to "
            "`GDAL_MAX_DATASET_POOL_SIZE` files (100 by default). That memory grows with the number of files in a "
            "mosaic, not with its area.",
            "",
        ]
    lines += [
        _image("bench_memory"),
        "",
    ]
    return lines


def _search_section(search: dict[str, Any], preset_name: str) -> list[str]:
    built = [size for size in search["sizes"] if size.get("hnsw_built")]
    hnsw = built[0]["hnsw"] if built else {}
    lines = [
        "## 3. Search: HNSW against exact search",
        "",
        f"Real embeddings: {search['real_count']:,} tiles of {search['real_rasters']} shared rasters, each tiled "
        "by `build_index` at two tile sizes (224 and 112 source px, 50 % overlap) with the bundled fp32 encoder; "
        "cached in `bench/.cache/` per encoder checksum. "
        f"{search['held_out_queries']} of them, drawn at random, are the queries and are left out of every collection. "
        f"The collections start with the remaining {search['seed_count']:,} real embeddings. Larger ones add "
        "points between real embeddings. Each lies on the segment from a random real embedding to one of its "
        f"{search.get('grow_neighbours', 10)} nearest real neighbours, at a uniform random position, plus isotropic "
        f"Gaussian noise of norm {search['noise_norm']:.3f} (a tenth of the median distance from a real embedding "
        f"to its nearest real neighbour, {search['median_nn_distance']:.3f}), re-normalised to unit length. Such "
        "points stand for tiles part of the way between two similar tiles, so the added vectors follow the real "
        "data. Vectors are stored as float16, as the index stores them.",
        "",
        "The previous growth added noisy copies of single real embeddings (noise norm half that distance). At 1M "
        "vectors it piled about 170 near-equidistant copies around each real tile, more than the 2 x M links a node "
        "keeps on the bottom layer, and recall@10 fell to 0.38 at every ef up to 512 (full run of 2026-12-04 at "
        "commit c9f4536). Exact top-10s inside such piles are near-ties, so that figure measured the growth method "
        "more than the index; it remains a warning for rasters with very many near-identical tiles (open water, "
        "bare fields), where the exact order among equally good matches is not stable either.",
        "",
        f"HNSW parameters are the engine's defaults in `core/index.py`: M = {hnsw.get('m')}, ef_construction = "
        f"{hnsw.get('ef_construction')}, ef_search = {hnsw.get('ef_search')}, raised to k when k is larger. "
        "`core/index.py` gives the reasons: at 1280 dimensions the float32 vector (5 KiB) dwarfs M = 32 links, so "
        "the recall that a larger M buys costs little memory, and building is dominated by the encoder, so a high "
        "ef_construction is affordable. The ef sweep below shows what ef_search trades.",
        "",
        "Exact search is `core.index.exact_knn` on the same collection: it converts blocks of float16 rows to "
        "float32 and multiplies, one query at a time, once over an in-memory array and once over the index's "
        "memory-mapped file. Recall is measured against its top-k for all queries. A plain float32 matrix-vector "
        "product with `argpartition` over a float32 copy is timed too (up to 200,000 vectors, because 1M x 1280 "
        "float32 is 5 GB): it separates the cost of the float16 conversion from the search itself. Latencies are "
        "single queries, as the plugin searches one query vector at a time; medians.",
        "",
    ]
    rows = []
    for size in search["sizes"]:
        if size.get("hnsw_built"):
            files = size["file_bytes"]
            rows.append([
                f"{size['count']:,}", f"{size['real_in_collection']:,}", _number(size["build_s"], 1),
                _number(size["build_rate_vectors_per_s"], 0),
                f"{size['disk_bytes_per_tile']:.0f} ({files['graph'] / size['count']:.0f} + "
                f"{files['embeddings'] / size['count']:.0f} + {files['tiles'] / size['count']:.0f})",
                _number(size["hnsw_median_ms"], 2), _number(size["exact_median_ms"], 1),
                _number(size["exact_index_median_ms"], 1), _number(size.get("float32_matmul_median_ms"), 1),
                f"{size['exact_median_ms'] / size['hnsw_median_ms']:.0f}x",
                f"**{size['recall_at_10_default_ef']:.4f}**", _number(size["recall_at_100_default_ef"], 4),
                _fallbacks(size),
            ])
        else:
            rows.append([f"{size['count']:,}", f"{size['real_in_collection']:,}", "not built", "–", "–", "–",
                         _number(size["exact_median_ms"], 1), "–", _number(size.get("float32_matmul_median_ms"), 1),
                         "–", "–", "–", "–"])
    lines += _table([
        "vectors", "of which real", "HNSW build s", "insert rate (vectors/s)",
        "bytes on disk per tile (graph + embeddings + tile table)", "HNSW ms/query (k=10)",
        "exact_knn ms/query (float16 in memory)", "exact_knn ms/query (index file, memory-mapped)",
        "float32 matrix product ms/query", "exact_knn / HNSW",
        "recall@10", "recall@100", "queries answered by exact fallback, k=10 / k=100",
    ], rows)
    lines += ["HNSW build time is `TileIndex.create` + `add` in blocks of 10,000 + `save`, with hnswlib using "
              "both cores. Goal: recall@10 >= 0.98 at the default ef.", ""]
    low_recall = [size for size in built if size.get("recall_at_10_default_ef", 1.0) < 0.9]
    if low_recall:
        real_count = max(1, search["real_count"] - search["held_out_queries"])
        lines += [
            "Low recall at the largest sizes is not fixed by a larger ef (see the sweep below), which points at "
            "the graph rather than the search: the grown collections hold about "
            f"{max(size['count'] for size in low_recall) // real_count:,} noisy copies of each real embedding, "
            "far more than the 2 x M links a node keeps on the bottom layer, so each cluster of copies links "
            "mostly to itself and the graph can split into islands. This is a property of the growth method "
            "as much as of HNSW; real rasters with many near-identical tiles (open water, bare fields) may "
            "behave alike, and whether they do is not measured here.",
            "",
        ]

    sweep_rows = []
    for size in built:
        for row in size["ef_sweep"]:
            sweep_rows.append([f"{size['count']:,}", row["k"], row["ef"], row.get("queries", "–"),
                               _number(row["recall"], 4), _number(row["median_ms"], 2), _number(row["p95_ms"], 2),
                               row.get("exact_fallbacks", "–")])
    lines += [
        "ef sweep (`TileIndex.knn(..., ef=...)`). When hnswlib cannot return k results (its search reached fewer "
        "than k nodes), `TileIndex.knn` logs a warning and answers that query by exact search; the last column "
        "counts those queries. Their results are exact, so they raise recall and latency alike.",
        "",
    ]
    lines += _table(["vectors", "k", "ef", "queries", "recall", "median ms", "p95 ms", "exact fallbacks"],
                    sweep_rows)
    lines += [_image("bench_search"), ""]

    largest = max(built, key=lambda size: size["count"]) if built else None
    for size in search["sizes"]:
        if size.get("hnsw_built"):
            continue
        reason = size.get("hnsw_skipped_reason", f"the {preset_name} preset measures exact search only at this size")
        lines += [f"**Not measured: an HNSW index over {size['count']:,} vectors**, because {reason}. Exact search "
                  "over it was measured (table above).", ""]
    if not any(size["count"] >= MILLION for size in search["sizes"]) and largest is not None:
        estimate = hnsw_build_estimate_s(search, MILLION)
        lines += [
            f"**Not measured: {MILLION:,} vectors** (the {preset_name} preset stops at "
            f"{max(size['count'] for size in search['sizes']):,}). At the insert rate measured at "
            f"{largest['count']:,} vectors ({largest['build_rate_vectors_per_s']:.0f} vectors/s), an HNSW build over "
            f"{MILLION:,} would take at least {estimate / 60:.0f} minutes; that is an estimate, because the rate "
            "falls as the graph grows.",
            "",
        ]
    return lines


def _fallbacks(size: dict[str, Any]) -> str:
    if "exact_fallbacks_at_10" not in size:
        return "–"
    return (f"{size['exact_fallbacks_at_10']} of {size['queries_at_10']} / "
            f"{size['exact_fallbacks_at_100']} of {size['queries_at_100']}")


def _retrieval_dataset(result: dict[str, Any], image_name: str, min_component: Optional[float]) -> list[str]:
    methods = result["methods"]
    baseline = methods[0]
    ap_name = "mAP" if result["ap_cutoff"] is None else f"mAP@{result['ap_cutoff']}"
    lines = [
        f"### {result['dataset']}",
        "",
        f"{result['chips']} chips ({result['classes']} classes x {result['per_class']}), {result['chip_size_px']} px, "
        f"laid out as a {result['grid'][0]} x {result['grid'][1]} GeoTIFF mosaic in UTM 33N with cells of "
        f"{result['cell_size_m']:g} m (one chip per cell, order shuffled with a fixed seed), indexed with "
        "`tile_ground_size_m` = cell size and no overlap, so every tile is one chip. Every chip is a query: "
        f"`embed_query` over its cell, then `search(k={result['k']})` with the query's footprint excluded. "
        f"{ap_name} is computed on those {result['k']} results"
        + ("" if result["ap_cutoff"] is None else f", divided by min(relevant, {result['ap_cutoff']})")
        + "; full-ranking mAP ranks every indexed tile by exact cosine similarity to the same query embeddings. "
        f"Chance precision is {result['chance_precision']:.3f}.",
        "",
    ]
    rows = []
    for method in methods:
        rows.append([
            method["encoder"], f"**{method['precision_at_10']:.3f}**", _number(method["map"]),
            _number(method["full_ranking_map"]),
            f"{method['precision_at_10'] / baseline['precision_at_10']:.2f}x",
            method.get("tiles_indexed", "–"),
            "–" if "build_s" not in method else f"{method['build_s']:.0f} / {method['embed_queries_s']:.0f} / "
                                                 f"{method['search_s']:.0f}",
        ])
    lines += _table(["method", "precision@10", ap_name, "full-ranking mAP", "P@10 / colour histogram",
                     "tiles indexed", "build / embed queries / search (s)"], rows)

    per_class_rows = []
    for name in methods[0]["precision_at_10_by_class"]:
        per_class_rows.append([name] + [_number(method["precision_at_10_by_class"][name], 2) for method in methods]
                              + [_number(method["map_by_class"][name], 2) for method in methods])
    header = (["class"] + [f"P@10 {method['encoder']}" for method in methods]
              + [f"{ap_name} {method['encoder']}" for method in methods])
    lines += ["<details><summary>Per class</summary>", ""] + _table(header, per_class_rows) + ["</details>", ""]
    lines += [_image(image_name), ""]

    negatives = result.get("negatives")
    if negatives:
        best = max(negatives["variants"], key=lambda row: row["precision_at_10"])
        per_class = negatives["queries"] // max(1, len(negatives["confusable"]))
        pairs = ", ".join(f"{label} → {other}" for label, other in sorted(negatives["confusable"].items()))
        lines += [
            f"**Negatives ({result['dataset']}, {negatives['encoder']}).** For each class, the confusable class is "
            f"the other class seen most often in its queries' top 10 above ({pairs}). For {per_class} queries per "
            f"class ({negatives['queries']} in all, the first cells of each class in the shuffled mosaic), the "
            "negatives are the best-ranked chips of the confusable class in the positive-only result, as an analyst "
            "would mark the first wrong matches. Every variant excludes the query and both candidate negatives from "
            "its results, so all rank the same candidates. `mean` and `max` are the strategies of `core/search.py`; "
            "w is `negative_weight`.",
            "",
        ]
        rows = sorted(negatives["variants"], key=lambda row: -row["precision_at_10"])
        lines += _table(
            ["variant", "precision@10", "share of confusable class in top 10"],
            [[row["variant"], _number(row["precision_at_10"]), _number(row["confusable_share_at_10"])] for row in rows],
        )
        lines += [f"Best: {best['variant']} (precision@10 {best['precision_at_10']:.3f}).", ""]
        if min_component is not None and min_component >= 0:
            lines += [
                "With one positive and one negative, `mean` and `max` rank tiles alike: `mean` orders by "
                "cos(p, t) - w cos(n, t) divided by a constant, and `max` by cos(p, t) - w max(0, cos(n, t)), which "
                "is the same whenever cos(n, t) >= 0. That holds here because every component of this encoder's "
                f"embeddings is >= 0 (the smallest over the search benchmark's real embeddings is {min_component:g}), "
                "so no two of them have a negative cosine. Their small differences come from the candidate sets "
                "that each strategy's nearest-neighbour search returns.",
                "",
            ]
    return lines


def _retrieval_section(retrieval: list[dict[str, Any]], min_component: Optional[float]) -> list[str]:
    lines = [
        "## 4. Retrieval quality through the pipeline",
        "",
        "Colour histogram: per-channel histograms of the 8-bit mosaic pixels, 16 bins per channel, square-rooted "
        "and compared by cosine similarity (the Bhattacharyya coefficient): a non-learned baseline. "
        "It ranks all other chips exactly.",
        "",
    ]
    for result in retrieval:
        lines += _retrieval_dataset(result, f"bench_retrieval_{result['dataset'].lower()}", min_component)
    return lines


def _encoder_section() -> list[str]:
    if not ENCODER_PAGE.is_file():
        return ["## Encoder-only benchmarks", "", "`docs/benchmarks-encoder.md` does not exist yet.", ""]
    text = ENCODER_PAGE.read_text(encoding="utf-8")
    # Demote every heading one level so the included page nests under this section.
    text = re.sub(r"^(#{1,5}) ", lambda match: "#" + match.group(1) + " ", text, flags=re.MULTILINE)
    return ["## Encoder-only benchmarks", "",
            "Included unchanged (headings demoted) from `docs/benchmarks-encoder.md`, which the encoder's own "
            "script writes; its numbers come from that script's run, not from this one.", "", text.strip(), ""]


def _repeat_section(results: dict[str, Any], previous: Optional[dict[str, Any]]) -> list[str]:
    lines = ["## Repeatability", ""]
    if previous is None:
        return lines + ["No earlier run with the same preset on this machine was found in `bench/.cache/runs/`, so "
                        "this page shows one run only.", ""]
    rows = []
    for label, now, before in _key_figures(results, previous):
        change = (now - before) / before * 100 if before else float("nan")
        rows.append([label, _number(before, 4), _number(now, 4), f"{change:+.1f} %"])
    commit = previous["machine"]["git_commit"][:12]
    lines += [f"The same preset ran before at {previous['started_at']} (commit `{commit}`). Key figures of both runs:",
              ""]
    # A run read back from JSON has lists where a fresh one has tuples; compare both as JSON.
    changed = _changed_settings(json.loads(json.dumps(previous.get("preset_values", {}))),
                                json.loads(json.dumps(results.get("preset_values", {}))))
    if changed:
        lines += ["The preset's settings changed between the two runs, so figures that depend on them are not "
                  f"like for like: {'; '.join(changed)}.", ""]
    lines += _table(["figure", "earlier run", "this run", "change"], rows)
    lines += ["Retrieval precision is deterministic for given data, encoder and parameters. HNSW recall can differ "
              "between runs although the collections come from fixed seeds, because hnswlib inserts with two "
              "threads and the graph depends on their interleaving. Rates and latencies follow the machine's load "
              "(see the load averages at the top).", ""]
    return lines


def _changed_settings(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"`{prefix}{key}` {old} → {new}")
    return changed


def _key_figures(results: dict[str, Any], previous: dict[str, Any]) -> list[tuple[str, float, float]]:
    figures = []

    def add(label: str, path: tuple, transform=lambda value: value) -> None:
        try:
            now, before = _dig(results, path), _dig(previous, path)
        except (KeyError, IndexError, TypeError):
            return
        figures.append((label, transform(now), transform(before)))

    for position, item in enumerate(results.get("throughput", {}).get("encoders", [])):
        add(f"throughput ratio, {item['encoder']}", ("throughput", "encoders", position, "ratio"))
        add(f"pipeline tiles/s, {item['encoder']}", ("throughput", "encoders", position, "pipeline_tiles_per_s"))
    add("memory ratio", ("memory", "ratio"))
    for position, size in enumerate(results.get("search", {}).get("sizes", [])):
        if size.get("hnsw_built"):
            add(f"recall@10, {size['count']:,}", ("search", "sizes", position, "recall_at_10_default_ef"))
            add(f"HNSW ms/query, {size['count']:,}", ("search", "sizes", position, "hnsw_median_ms"))
        add(f"exact ms/query, {size['count']:,}", ("search", "sizes", position, "exact_median_ms"))
    for dataset_position, dataset in enumerate(results.get("retrieval", [])):
        for method_position, method in enumerate(dataset["methods"]):
            add(f"{dataset['dataset']} P@10, {method['encoder']}",
                ("retrieval", dataset_position, "methods", method_position, "precision_at_10"))
    return figures


def _dig(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def write_page(results: dict[str, Any], previous: Optional[dict[str, Any]], output: Path) -> Path:
    """Write the whole page to ``output``; the plots go to docs/img/bench_*.png."""
    from . import plots

    preset = results["preset"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `bash scripts/bench.sh --{preset}` on {results['started_at']} in "
        f"{results['total_s'] / 60:.1f} minutes; do not edit by hand, rerun the command. Every figure is a ratio "
        "against a baseline measured in the same run, and each names the goal it is measured against. The JSON of "
        "each run is kept in `bench/.cache/runs/` (not committed).",
        "",
        "Section times (1-minute load average before and after, on 2 CPUs): " + ", ".join(
            f"{name} {seconds:.0f} s ({results['load_average'][name][0]:.1f} / {results['load_average'][name][1]:.1f})"
            for name, seconds in results["section_s"].items()
        ) + ". A load above the CPU count means other processes shared the machine and slowed the timings; "
        "ratios measured within one section are affected less than absolute rates.",
        "",
    ]
    lines += _machine_section(results["machine"])
    lines += ["## Goals", ""] + _table(["figure", "goal", "measured", "met"], _goal_rows(results))

    if results.get("throughput"):
        plots.plot_throughput(results["throughput"], IMAGE_DIR / "bench_throughput.png")
        lines += _throughput_section(results["throughput"])
    if results.get("memory"):
        plots.plot_memory(results["memory"], IMAGE_DIR / "bench_memory.png")
        lines += _memory_section(results["memory"])
    if results.get("search"):
        plots.plot_search(results["search"], IMAGE_DIR / "bench_search.png")
        lines += _search_section(results["search"], preset)
    if results.get("retrieval"):
        for dataset in results["retrieval"]:
            plots.plot_retrieval(dataset, IMAGE_DIR / f"bench_retrieval_{dataset['dataset'].lower()}.png")
        min_component = results.get("search", {}).get("min_embedding_component")
        lines += _retrieval_section(results["retrieval"], min_component)
    lines += _encoder_section()
    lines += _repeat_section(results, previous)
    lines += ["## Not measured", ""] + [f"- {item}" for item in results.get("not_measured", [])] + [""]
    output.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return output
