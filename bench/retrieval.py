"""Retrieval quality through the real pipeline on labelled chips laid out as a mosaic.

Each chip set becomes a GeoTIFF with one chip per grid cell (cell size = chip size), indexed by
``build_index`` with one tile per cell and no overlap. Every chip is then queried with
``embed_query`` over its cell and ``search``; the query's own tile is excluded through the
footprint exclusion the plugin uses. A tile is relevant when its chip carries the query's class.

A colour-histogram baseline ranks the same chips without any learned model: per-channel
histograms of the 8-bit values (16 bins each), square-rooted so that the dot product of two
L2-normalised vectors is the Bhattacharyya coefficient, compared by cosine similarity.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lookalike.core.encoder import OnnxEncoder
from lookalike.core.index import TileIndex, exact_knn
from lookalike.core.pipeline import BuildParameters, build_index, embed_query
from lookalike.core.raster import RasterSource
from lookalike.core.search import search

from .common import CACHE_DIR, log
from .datasets import ChipMosaic, LabelledChips, read_mosaic_cells, write_chip_mosaic
from .metrics import mean_by_label, ranking_scores

HISTOGRAM_BINS = 16
PRECISION_K = 10
AP_CUTOFF = 100
LAYOUT_SEED = 7
NEGATIVE_WEIGHTS = (0.5, 1.0)


def colour_histograms(cells: np.ndarray) -> np.ndarray:
    """Return L2-normalised square-rooted per-channel histograms of uint8 ``(n, 3, H, W)`` chips."""
    count, channels = cells.shape[:2]
    bins = (cells.reshape(count, channels, -1) // (256 // HISTOGRAM_BINS)).astype(np.int64)
    features = np.zeros((count, channels, HISTOGRAM_BINS), dtype=np.float64)
    for channel in range(channels):
        offsets = np.arange(count)[:, None] * HISTOGRAM_BINS
        flat = np.bincount((bins[:, channel] + offsets).ravel(), minlength=count * HISTOGRAM_BINS)
        features[:, channel] = flat.reshape(count, HISTOGRAM_BINS)
    features /= features.sum(axis=2, keepdims=True)
    features = np.sqrt(features).reshape(count, -1)
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def rank_all_others(vectors: np.ndarray, k: int) -> list[list[int]]:
    """Rank every item's ``k`` most similar other items by exact cosine similarity."""
    ids, _ = exact_knn(vectors, vectors, k + 1)
    rankings = []
    for query_id, row in enumerate(ids.tolist()):
        rankings.append([item for item in row if item != query_id][:k])
    return rankings


def prepare_mosaic(chips: LabelledChips, folder: Path) -> tuple[ChipMosaic, list[str]]:
    """Write the chips in a shuffled cell order; return the mosaic and the label of each cell."""
    order = np.random.default_rng(LAYOUT_SEED).permutation(len(chips.paths))
    mosaic = write_chip_mosaic(chips, folder / f"{chips.name.lower()}_mosaic.tif", order.tolist())
    return mosaic, [chips.labels[index] for index in order]


def _tile_cell(index: TileIndex, mosaic: ChipMosaic) -> np.ndarray:
    """Return the mosaic cell of every tile id, checking that the grid matches the cells."""
    grid = index.sources[0]["grid"]
    if (grid["n_rows"], grid["n_cols"]) != (mosaic.n_rows, mosaic.n_cols):
        raise RuntimeError(
            f"the index grid is {grid['n_rows']} x {grid['n_cols']} tiles but the mosaic has "
            f"{mosaic.n_rows} x {mosaic.n_cols} cells; the tile size must equal the cell size"
        )
    table = index.tile_table
    return table["row"].astype(np.int64) * mosaic.n_cols + table["col"].astype(np.int64)


def _embed_cells(index: TileIndex, encoder: OnnxEncoder, mosaic: ChipMosaic) -> tuple[np.ndarray, list]:
    """Embed every cell through ``embed_query``; return the embeddings and each query footprint."""
    raster = RasterSource(str(mosaic.path))
    embeddings = []
    footprints = []
    try:
        manifest = index.manifest
        for cell in range(mosaic.n_rows * mosaic.n_cols):
            chips = embed_query(manifest, encoder, raster, mosaic.cell_bounds(cell), mosaic.crs_wkt)
            embeddings.append(chips.embeddings[0])
            footprints.append((chips.footprints[0], chips.crs_wkt))
    finally:
        raster.close()
    return np.stack(embeddings), footprints


def _search_cells(
    index: TileIndex, tile_cells: np.ndarray, query_embeddings: np.ndarray, footprints: list,
    cells: Sequence[int], k: int,
) -> list[list[int]]:
    rankings = []
    for cell in cells:
        matches = search(index, query_embeddings[cell], k=k, exclude=[footprints[cell]])
        rankings.append([int(tile_cells[match.tile_id]) for match in matches])
    return rankings


def _scores(rankings, query_cells, cell_labels, ap_cutoff) -> dict[str, Any]:
    labels = dict(enumerate(cell_labels))
    precisions, average_precisions = ranking_scores(rankings, list(query_cells), labels, PRECISION_K, ap_cutoff)
    query_labels = [cell_labels[cell] for cell in query_cells]
    return {
        "precision_at_10": float(precisions.mean()),
        "map": float(average_precisions.mean()),
        "precision_at_10_by_class": mean_by_label(precisions, query_labels),
        "map_by_class": mean_by_label(average_precisions, query_labels),
    }


def evaluate_encoder(
    encoder_path: Path, mosaic: ChipMosaic, cell_labels: list[str], workdir: Path, k: int,
    ap_cutoff: Optional[int],
) -> dict[str, Any]:
    """Index the mosaic with one encoder, query every cell and score the rankings."""
    encoder = OnnxEncoder(encoder_path)
    folder = workdir / f"index_{encoder_path.stem}"
    params = BuildParameters(
        source_paths=(str(mosaic.path),),
        index_folder=str(folder),
        encoder_path=str(encoder_path),
        tile_ground_size_m=mosaic.cell_size_m,
        overlap_fraction=0.0,
        overwrite_existing_index=True,
    )
    started = time.perf_counter()
    report = build_index(params)
    build_s = time.perf_counter() - started
    index = TileIndex.open(folder)
    tile_cells = _tile_cell(index, mosaic)
    cell_count = mosaic.n_rows * mosaic.n_cols
    if index.count != cell_count:
        log(f"retrieval: {index.count} of {cell_count} cells indexed, skipped {report.skipped_by_reason}")

    started = time.perf_counter()
    query_embeddings, footprints = _embed_cells(index, encoder, mosaic)
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    cells = list(range(cell_count))
    rankings = _search_cells(index, tile_cells, query_embeddings, footprints, cells, k)
    search_s = time.perf_counter() - started

    result = _scores(rankings, cells, cell_labels, ap_cutoff)
    # Full-ranking mAP from the same query embeddings against the stored tile embeddings, exact.
    full = _full_ranking_map(query_embeddings, np.asarray(index.embeddings, dtype=np.float32), tile_cells,
                             cell_labels)
    result.update(
        encoder=encoder.name,
        encoder_file=encoder_path.name,
        tiles_indexed=index.count,
        skipped=report.skipped_by_reason,
        build_s=build_s,
        embed_queries_s=embed_s,
        search_s=search_s,
        full_ranking_map=full,
        k=k,
        ap_cutoff=ap_cutoff,
    )
    result["_state"] = (index, tile_cells, query_embeddings, footprints, rankings)
    return result


def _full_ranking_map(queries: np.ndarray, tiles: np.ndarray, tile_cells: np.ndarray, cell_labels) -> float:
    cell_of_tile = tile_cells.tolist()
    ids, _ = exact_knn(tiles, queries, tiles.shape[0])
    rankings = [[cell_of_tile[tile] for tile in row if cell_of_tile[tile] != cell] for cell, row in
                enumerate(ids.tolist())]
    _, average_precisions = ranking_scores(rankings, list(range(len(queries))), dict(enumerate(cell_labels)), 10)
    return float(average_precisions.mean())


def evaluate_histograms(mosaic: ChipMosaic, cell_labels: list[str], chip_size_px: int, k: int,
                        ap_cutoff: Optional[int]) -> dict[str, Any]:
    """Score the colour-histogram baseline on the pixels of the same mosaic cells."""
    features = colour_histograms(read_mosaic_cells(mosaic, chip_size_px))
    cells = list(range(len(cell_labels)))
    result = _scores(rank_all_others(features, k), cells, cell_labels, ap_cutoff)
    result["full_ranking_map"] = _scores(rank_all_others(features, len(cells) - 1), cells, cell_labels, None)["map"]
    result.update(encoder="colour histogram", k=k, ap_cutoff=ap_cutoff)
    return result


def confusable_classes(rankings: list[list[int]], cell_labels: list[str]) -> dict[str, str]:
    """Return, per class, the other class that appears most often in its queries' top 10."""
    counts: dict[str, Counter] = {}
    for cell, ranking in enumerate(rankings):
        own = cell_labels[cell]
        counter = counts.setdefault(own, Counter())
        counter.update(cell_labels[item] for item in ranking[:PRECISION_K] if cell_labels[item] != own)
    return {label: counter.most_common(1)[0][0] for label, counter in counts.items() if counter}


def evaluate_negatives(state, cell_labels: list[str], queries_per_class: int) -> dict[str, Any]:
    """Compare query strategies with one positive and one or two negatives from a confusable class.

    For each query the negatives are the best-ranked chips of the confusable class in the
    positive-only result, as an analyst would mark the first wrong matches. Every variant,
    including positive-only, excludes the query and both candidate negatives from its results,
    so all variants rank the same candidates.
    """
    index, tile_cells, query_embeddings, footprints, rankings = state
    confusable = confusable_classes(rankings, cell_labels)
    cells_by_class: dict[str, list[int]] = {}
    for cell, label in enumerate(cell_labels):
        cells_by_class.setdefault(label, []).append(cell)
    similarity_cache = np.asarray(index.embeddings, dtype=np.float32)
    tile_of_cell = np.empty(len(cell_labels), dtype=np.int64)
    tile_of_cell[tile_cells] = np.arange(tile_cells.size)

    variants = [("positive only", "mean", 0, 0.0)]
    for negative_count in (1, 2):
        for strategy in ("mean", "max"):
            for weight in NEGATIVE_WEIGHTS:
                variants.append((f"{strategy}, {negative_count} neg, w={weight:g}", strategy, negative_count, weight))
    precision = {name: [] for name, *_ in variants}
    confusion_share = {name: [] for name, *_ in variants}
    query_count = 0
    for label, cells in sorted(cells_by_class.items()):
        if label not in confusable:
            continue
        other = confusable[label]
        for cell in cells[:queries_per_class]:
            negatives = _pick_negatives(cell, rankings[cell], cells_by_class[other], query_embeddings, similarity_cache,
                                        tile_of_cell, 2)
            exclude = [footprints[cell]] + [footprints[negative] for negative in negatives]
            query_count += 1
            for name, strategy, negative_count, weight in variants:
                chosen = negatives[:negative_count]
                matches = search(
                    index, query_embeddings[cell],
                    query_embeddings[chosen] if chosen else None,
                    k=PRECISION_K, exclude=exclude, strategy=strategy, negative_weight=weight,
                )
                result_labels = [cell_labels[int(tile_cells[match.tile_id])] for match in matches]
                precision[name].append(sum(item == label for item in result_labels) / PRECISION_K)
                confusion_share[name].append(sum(item == other for item in result_labels) / PRECISION_K)
    rows = [
        {"variant": name, "strategy": strategy, "negatives": negative_count, "negative_weight": weight,
         "precision_at_10": float(np.mean(precision[name])),
         "confusable_share_at_10": float(np.mean(confusion_share[name]))}
        for name, strategy, negative_count, weight in variants
    ]
    return {"queries": query_count, "confusable": confusable, "variants": rows}


def _pick_negatives(cell, ranking, other_cells, query_embeddings, tile_embeddings, tile_of_cell, count) -> list[int]:
    other_set = set(other_cells)
    picked = [item for item in ranking if item in other_set][:count]
    if len(picked) < count:
        # Fewer confusable chips in the returned list: take the most similar remaining ones.
        remaining = [item for item in other_cells if item not in picked]
        similarity = tile_embeddings[tile_of_cell[remaining]] @ query_embeddings[cell]
        picked += [remaining[position] for position in np.argsort(-similarity)[: count - len(picked)]]
    return picked


def run(chips: LabelledChips, encoder_paths: Sequence[Path], negatives_queries_per_class: int) -> dict[str, Any]:
    """Run the retrieval benchmark on one chip set for each encoder and the histogram baseline."""
    workdir = Path(tempfile.mkdtemp(prefix=f"retrieval_{chips.name.lower()}_", dir=_scratch_root()))
    try:
        started = time.perf_counter()
        mosaic, cell_labels = prepare_mosaic(chips, workdir)
        mosaic_s = time.perf_counter() - started
        cell_count = len(cell_labels)
        k = min(AP_CUTOFF, cell_count - 1)
        ap_cutoff = None if k == cell_count - 1 else AP_CUTOFF
        log(f"retrieval: {chips.name} mosaic of {mosaic.n_rows} x {mosaic.n_cols} cells written in {mosaic_s:.1f} s")
        results: dict[str, Any] = {
            "dataset": chips.name,
            "chips": cell_count,
            "classes": len(chips.classes),
            "per_class": cell_count // len(chips.classes),
            "chip_size_px": chips.chip_size_px,
            "cell_size_m": mosaic.cell_size_m,
            "grid": [mosaic.n_rows, mosaic.n_cols],
            "k": k,
            "ap_cutoff": ap_cutoff,
            "chance_precision": (cell_count // len(chips.classes) - 1) / (cell_count - 1),
            "methods": [],
        }
        histogram = evaluate_histograms(mosaic, cell_labels, chips.chip_size_px, k, ap_cutoff)
        results["methods"].append(histogram)
        log(f"retrieval: {chips.name} colour histogram P@10 {histogram['precision_at_10']:.3f}")
        for position, encoder_path in enumerate(encoder_paths):
            result = evaluate_encoder(encoder_path, mosaic, cell_labels, workdir, k, ap_cutoff)
            state = result.pop("_state")
            log(f"retrieval: {chips.name} {result['encoder']} P@10 {result['precision_at_10']:.3f}, "
                f"mAP {result['map']:.3f} (build {result['build_s']:.0f} s, queries {result['embed_queries_s']:.0f} s)")
            if position == 0 and negatives_queries_per_class > 0:
                started = time.perf_counter()
                negatives = evaluate_negatives(state, cell_labels, negatives_queries_per_class)
                negatives["encoder"] = result["encoder"]
                negatives["seconds"] = time.perf_counter() - started
                results["negatives"] = negatives
            results["methods"].append(result)
            del state
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _scratch_root() -> Path:
    root = CACHE_DIR / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root
