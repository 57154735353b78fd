"""Search benchmark: HNSW (``TileIndex.knn``) against exact search (``exact_knn``) on real embeddings.

Real embeddings come from tiling the shared rasters with the build pipeline at two tile sizes.
Larger collections are grown from them: every added vector lies on the segment between a real
embedding and one of its ten nearest real neighbours, at a uniform random position, plus a
little isotropic Gaussian noise, re-normalised. A tile shifted part of the way towards its
neighbour gives such a point. The added vectors therefore fill the space between real tiles
instead of piling up around single tiles.

Noisy copies of single real embeddings (noise norm half the median nearest-neighbour distance)
do pile up: at 1M vectors they made clusters of about 170 near-equidistant copies per real
tile, more than the 2 * M links a node keeps. Recall@10 then fell to 0.38 at every ef.

Queries are real embeddings held out of the collection and of the seeds of the added vectors.

Queries are real embeddings held out of the collection and of the seeds of the added vectors.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lookalike.core import get_logger
from lookalike.core.encoder import OnnxEncoder
from lookalike.core.errors import LookalikeError
from lookalike.core.grid import TileGrid
from lookalike.core.index import DEFAULT_EF_SEARCH, TileIndex, exact_knn
from lookalike.core.pipeline import BuildParameters, build_index

from .common import CACHE_DIR, log, median
from .datasets import GEO_FOLDER, SEARCH_RASTERS
from .metrics import recall_at_k

# Tile sizes in source pixels: 224 reads chips at the raster's native resolution, 112 at twice
# that (upsampled), so each raster contributes tiles at two scales.
REAL_TILE_SIZES_SOURCE_PX = (224.0, 112.0)
REAL_OVERLAP_FRACTION = 0.5
# Added vectors lie between a real embedding and one of this many nearest real neighbours.
GROW_NEIGHBOURS = 10
# Noise norm as a fraction of the median real nearest-neighbour distance; it only keeps two
# added vectors on the same segment from coinciding.
NOISE_FRACTION_OF_NN_DISTANCE = 0.1
HELD_OUT_QUERIES = 200
GROW_CHUNK_VECTORS = 65536
ADD_CHUNK_VECTORS = 10000
EF_SWEEP_K10 = (16, 32, 64, 128, 256, 512)
EF_SWEEP_K100 = (100, 128, 256, 512)
# Above FLOAT32_EXACT_MAX_VECTORS: k=100 runs on this many queries and these ef values only.
LARGE_K100_QUERIES = 50
LARGE_EF_SWEEP_K100 = (512,)
RANDOM_SEED = 20240
# Exact single-query timings per size: at most this many vectors read in total, at least 5 queries.
EXACT_TIMING_VECTOR_BUDGET = 2_000_000
# Largest collection also searched as a float32 matrix in memory (1M x 1280 float32 is 5 GB).
FLOAT32_EXACT_MAX_VECTORS = 200_000
# An HNSW build is skipped when the insert rate measured at the previous size predicts more than
# this. The prediction is optimistic because the rate falls as the graph grows.
HNSW_BUILD_BUDGET_S = 600.0
# Bytes per vector besides the float32 copy in the graph: M=32 links on layer 0 (2 * M ids of
# 4 bytes) plus hnswlib's per-element header, rounded up.
HNSW_LINK_BYTES_PER_VECTOR = 400


def float32_top_k(collection: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Return the ids of the k largest inner products: one matrix-vector product and a partition."""
    similarities = collection @ query
    top = np.argpartition(-similarities, k)[:k]
    return top[np.argsort(-similarities[top])]


@dataclass(frozen=True)
class SearchPreset:
    """Collection sizes to measure and how many single-query timings each gets."""

    hnsw_sizes: tuple[int, ...]
    exact_only_sizes: tuple[int, ...]
    timed_queries: int
    hnsw_build_budget_s: float = HNSW_BUILD_BUDGET_S


def real_embeddings(encoder: OnnxEncoder) -> tuple[np.ndarray, list[str]]:
    """Return embeddings of every tile of the search rasters, computed once per encoder and cached.

    Returns ``(float32 (n, dim), origin per row)`` where the origin names the raster and tile size.
    """
    cache_path = CACHE_DIR / f"real_embeddings_{encoder.checksum[:16]}.npz"
    if cache_path.is_file():
        cached = np.load(cache_path, allow_pickle=False)
        return cached["embeddings"].astype(np.float32), [str(name) for name in cached["origins"]]

    blocks: list[np.ndarray] = []
    origins: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="real_embeddings_", dir=_scratch_root()))
    try:
        for relative in SEARCH_RASTERS:
            for tile_size in REAL_TILE_SIZES_SOURCE_PX:
                folder = scratch / f"{Path(relative).stem}_{int(tile_size)}"
                params = BuildParameters(
                    source_paths=(str(GEO_FOLDER / relative),),
                    index_folder=str(folder),
                    encoder_path=str(encoder.path),
                    tile_size_source_px=tile_size,
                    overlap_fraction=REAL_OVERLAP_FRACTION,
                )
                try:
                    report = build_index(params)
                except LookalikeError as error:
                    log(f"search: skipping {relative} at {tile_size:g} px: {error}")
                    continue
                index = TileIndex.open(folder)
                blocks.append(np.asarray(index.embeddings, dtype=np.float32))
                origins.extend([f"{relative}@{int(tile_size)}px"] * index.count)
                log(f"search: {relative} at {tile_size:g} px: {report.tiles_embedded} tiles")
                del index
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    embeddings = np.concatenate(blocks)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_path, embeddings=embeddings.astype(np.float16), origins=np.asarray(origins))
    return embeddings.astype(np.float16).astype(np.float32), origins


def _scratch_root() -> Path:
    root = CACHE_DIR / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def grow_collection(seeds: np.ndarray, neighbour_ids: np.ndarray, total: int, noise_norm: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Return float16 ``(total, dim)``: the seeds first, then points between seeds and their neighbours.

    ``neighbour_ids[i]`` lists the nearest other seeds of seed ``i``.
    """
    dim = seeds.shape[1]
    collection = np.empty((total, dim), dtype=np.float16)
    real_count = min(total, seeds.shape[0])
    collection[:real_count] = seeds[:real_count]
    sigma = noise_norm / np.sqrt(dim)
    for start in range(real_count, total, GROW_CHUNK_VECTORS):
        stop = min(total, start + GROW_CHUNK_VECTORS)
        count = stop - start
        first = rng.integers(0, seeds.shape[0], count)
        second = neighbour_ids[first, rng.integers(0, neighbour_ids.shape[1], count)]
        position = rng.random(count, dtype=np.float32)[:, None]
        vectors = seeds[first] * (1.0 - position) + seeds[second] * position
        vectors += rng.normal(0.0, sigma, vectors.shape).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        collection[start:stop] = vectors
    return collection


def nearest_seed_neighbours(seeds: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """Return each seed's ``count`` nearest other seeds and the median nearest-neighbour distance."""
    ids, similarities = exact_knn(seeds, seeds, count + 1)
    # Column 0 is the seed itself (or an exact duplicate of it); the rest are its neighbours.
    nearest_distance = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * similarities[:, 1]))
    return ids[:, 1:], float(np.median(nearest_distance))


def _grid_for(count: int) -> TileGrid:
    from osgeo import osr

    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(3857)
    n_cols = 1000
    return TileGrid(
        crs_wkt=spatial_ref.ExportToWkt(), origin_x=0.0, origin_y=0.0, gsd=1.0, tile_size_px=224,
        stride_px=224, n_rows=max(1, -(-count // n_cols)), n_cols=n_cols,
    )


def _build_index(folder: Path, collection: np.ndarray, encoder: OnnxEncoder) -> tuple[TileIndex, float]:
    count = collection.shape[0]
    grid = _grid_for(count)
    started = time.perf_counter()
    index = TileIndex.create(
        folder,
        {"name": encoder.name, "checksum": encoder.checksum, "embedding_dim": collection.shape[1],
         "spec": {"name": encoder.name}},
        initial_capacity_tiles=count,
    )
    source_id = index.add_source({"path": "bench-synthetic", "grid": grid.to_dict()})
    for start in range(0, count, ADD_CHUNK_VECTORS):
        stop = min(count, start + ADD_CHUNK_VECTORS)
        positions = np.arange(start, stop)
        tiles = np.stack([np.full(stop - start, source_id), positions // grid.n_cols, positions % grid.n_cols], axis=1)
        index.add(np.asarray(collection[start:stop], dtype=np.float32), tiles.astype(np.int64))
    index.save()
    return index, time.perf_counter() - started


def _time_single_queries(run_query, queries: np.ndarray) -> list[float]:
    run_query(queries[0])  # warms caches and the memory map; not timed
    timings_ms = []
    for query in queries:
        started = time.perf_counter()
        run_query(query)
        timings_ms.append((time.perf_counter() - started) * 1000.0)
    return timings_ms


class _FallbackCounter(logging.Handler):
    """Counts the warnings ``TileIndex.knn`` logs when hnswlib fails and it falls back to exact search."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "using exact search" in record.getMessage():
            self.count += 1


def _run_knn(index: TileIndex, queries: np.ndarray, exact_ids: np.ndarray, k: int,
             ef: Optional[int]) -> dict[str, Any]:
    """Query one at a time through ``TileIndex.knn``, timing each; return recall, latency and fallbacks."""
    counter = _FallbackCounter()
    index_logger = get_logger("index")
    index.knn(queries[0][None, :], k, ef=ef)  # warms caches; not timed
    index_logger.addHandler(counter)
    # The engine's own warning for each fallback would flood the output; the count is reported.
    previous_propagate = index_logger.propagate
    index_logger.propagate = False
    try:
        rows = []
        timings_ms = []
        for query in queries:
            started = time.perf_counter()
            ids, _ = index.knn(query[None, :], k, ef=ef)
            timings_ms.append((time.perf_counter() - started) * 1000.0)
            rows.append(ids[0])
    finally:
        index_logger.removeHandler(counter)
        index_logger.propagate = previous_propagate
    return {
        "k": k, "ef": ef if ef is not None else index.hnsw_parameters["ef_search"], "queries": len(queries),
        "recall": recall_at_k(np.stack(rows), exact_ids[: len(queries)], k),
        "median_ms": median(timings_ms), "p95_ms": float(np.percentile(timings_ms, 95)),
        "exact_fallbacks": counter.count,
    }


def _measure_hnsw(index: TileIndex, queries: np.ndarray, exact_ids: np.ndarray) -> dict[str, Any]:
    sweep = []
    for k, ef_values in ((10, EF_SWEEP_K10), (100, EF_SWEEP_K100)):
        # A failed graph search costs a full exact search, seconds at 1M vectors, so the large
        # sizes sweep k=100 with fewer queries and ef values.
        if index.count > FLOAT32_EXACT_MAX_VECTORS and k == 100:
            ef_values = LARGE_EF_SWEEP_K100
            k_queries = queries[:LARGE_K100_QUERIES]
        else:
            k_queries = queries
        for ef in ef_values:
            sweep.append(_run_knn(index, k_queries, exact_ids, k, ef))
    return {"ef_sweep": sweep}


def measure_size(
    collection: np.ndarray, queries: np.ndarray, encoder: OnnxEncoder, preset: SearchPreset, with_hnsw: bool
) -> dict[str, Any]:
    """Measure exact search and, when ``with_hnsw``, an HNSW index over ``collection``."""
    count = collection.shape[0]
    result: dict[str, Any] = {"count": count, "hnsw_built": with_hnsw}

    started = time.perf_counter()
    exact_ids, _ = exact_knn(collection, queries, 100)
    result["exact_batch_s"] = time.perf_counter() - started
    # One exact query reads the whole collection, so large collections get fewer timed queries.
    timed = preset.timed_queries
    exact_timed = max(5, min(timed, EXACT_TIMING_VECTOR_BUDGET // count))
    exact_timings_ms = _time_single_queries(lambda query: exact_knn(collection, query, 10), queries[:exact_timed])
    result["exact_median_ms"] = median(exact_timings_ms)
    result["exact_timed_queries"] = exact_timed
    result["hnsw_timed_queries"] = timed
    if count <= FLOAT32_EXACT_MAX_VECTORS:
        as_float32 = collection.astype(np.float32)
        float32_ms = _time_single_queries(lambda query: float32_top_k(as_float32, query, 10), queries[:timed])
        result["float32_matmul_median_ms"] = median(float32_ms)
        del as_float32
    if not with_hnsw:
        return result

    folder = Path(tempfile.mkdtemp(prefix=f"search_{count}_", dir=_scratch_root()))
    try:
        index, build_s = _build_index(folder / "index", collection, encoder)
        result["build_s"] = build_s
        result["build_rate_vectors_per_s"] = count / build_s
        manifest = index.manifest
        disk_bytes = sum(path.stat().st_size for path in (folder / "index").iterdir() if path.is_file())
        result["disk_bytes"] = disk_bytes
        result["disk_bytes_per_tile"] = disk_bytes / count
        result["file_bytes"] = {kind: entry["size_bytes"] for kind, entry in manifest["files"].items()}
        result["hnsw"] = index.hnsw_parameters

        # The exact single-query timings above read an in-memory float16 array; the index path
        # below reads the memory-mapped file, as searches in the plugin do.
        index_exact_ms = _time_single_queries(lambda query: exact_knn(index.embeddings, query, 10),
                                              queries[:exact_timed])
        result["exact_index_median_ms"] = median(index_exact_ms)

        default_10 = _run_knn(index, queries, exact_ids, 10, None)
        result["recall_at_10_default_ef"] = default_10["recall"]
        result["hnsw_median_ms"] = default_10["median_ms"]
        result["hnsw_p95_ms"] = default_10["p95_ms"]
        result["exact_fallbacks_at_10"] = default_10["exact_fallbacks"]
        result["queries_at_10"] = default_10["queries"]
        k100_queries = queries if count <= FLOAT32_EXACT_MAX_VECTORS else queries[:LARGE_K100_QUERIES]
        default_100 = _run_knn(index, k100_queries, exact_ids, 100, None)
        result["recall_at_100_default_ef"] = default_100["recall"]
        result["hnsw_median_ms_at_100"] = default_100["median_ms"]
        result["exact_fallbacks_at_100"] = default_100["exact_fallbacks"]
        result["queries_at_100"] = default_100["queries"]
        result.update(_measure_hnsw(index, queries, exact_ids))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def run(encoder_path: Path, preset: SearchPreset) -> dict[str, Any]:
    """Run the search benchmark for every size of the preset and return its results."""
    encoder = OnnxEncoder(encoder_path)
    started = time.perf_counter()
    embeddings, origins = real_embeddings(encoder)
    real_s = time.perf_counter() - started
    rng = np.random.default_rng(RANDOM_SEED)
    order = rng.permutation(embeddings.shape[0])
    query_ids = order[:HELD_OUT_QUERIES]
    seed_ids = np.sort(order[HELD_OUT_QUERIES:])
    queries = embeddings[query_ids]
    seeds = embeddings[seed_ids]
    neighbour_ids, nn_distance = nearest_seed_neighbours(seeds, GROW_NEIGHBOURS)
    noise_norm = NOISE_FRACTION_OF_NN_DISTANCE * nn_distance
    log(f"search: {embeddings.shape[0]} real embeddings from {len(set(origins))} raster/scale pairs, "
        f"median nearest-neighbour distance {nn_distance:.3f}, noise norm {noise_norm:.3f}")

    results: dict[str, Any] = {
        "real_count": int(embeddings.shape[0]),
        "real_origin_count": len(set(origins)),
        "real_rasters": len({origin.split("@")[0] for origin in origins}),
        "real_seconds": real_s,
        "held_out_queries": int(queries.shape[0]),
        "seed_count": int(seeds.shape[0]),
        "median_nn_distance": nn_distance,
        "noise_norm": noise_norm,
        "grow_neighbours": GROW_NEIGHBOURS,
        "growth": "between_neighbours",
        "embedding_dim": int(embeddings.shape[1]),
        "min_embedding_component": float(embeddings.min()),
        "default_ef_search": DEFAULT_EF_SEARCH,
        "sizes": [],
    }
    sizes = [(size, True) for size in preset.hnsw_sizes] + [(size, False) for size in preset.exact_only_sizes]
    for size, wants_hnsw in sorted(sizes):
        skip_reason = (_hnsw_skip_reason(results["sizes"], size, embeddings.shape[1], preset.hnsw_build_budget_s)
                       if wants_hnsw else None)
        with_hnsw = wants_hnsw and skip_reason is None
        grow_started = time.perf_counter()
        collection = grow_collection(seeds, neighbour_ids, size, noise_norm, np.random.default_rng(RANDOM_SEED + size))
        grow_s = time.perf_counter() - grow_started
        log(f"search: {size} vectors grown in {grow_s:.1f} s; measuring {'HNSW and exact' if with_hnsw else 'exact'}"
            + (f" ({skip_reason})" if skip_reason else ""))
        size_result = measure_size(collection, queries, encoder, preset, with_hnsw)
        if skip_reason:
            size_result["hnsw_skipped_reason"] = skip_reason
        size_result["grow_s"] = grow_s
        size_result["real_in_collection"] = int(min(size, seeds.shape[0]))
        results["sizes"].append(size_result)
        log(f"search: {size}: {_summary(size_result)}")
        del collection
    return results


def _hnsw_skip_reason(measured: list[dict[str, Any]], size: int, dim: int, budget_s: float) -> Optional[str]:
    """Return why an HNSW build over ``size`` vectors would not fit the time or memory budget, or None."""
    built = [item for item in measured if item.get("hnsw_built")]
    if built:
        rate = built[-1]["build_rate_vectors_per_s"]
        if size / rate > budget_s:
            return (f"the insert rate of {rate:.0f} vectors/s measured at {built[-1]['count']:,} vectors predicts "
                    f"{size / rate / 60:.0f} min or more, above the {budget_s / 60:.0f} min budget")
    # The graph's float32 copy and links, plus the float16 collection, the index's float16 copy
    # and the copy that TileIndex.save() concatenates.
    needed_bytes = size * (dim * 4 + HNSW_LINK_BYTES_PER_VECTOR) + 3 * size * dim * 2
    available_bytes = _available_memory_bytes()
    if available_bytes is not None and needed_bytes * 1.2 > available_bytes:
        return (f"it needs about {needed_bytes / 2**30:.1f} GiB of memory and {available_bytes / 2**30:.1f} GiB "
                "was available")
    return None


def _available_memory_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _summary(size_result: dict[str, Any]) -> str:
    parts = [f"exact {size_result['exact_median_ms']:.1f} ms/query"]
    if size_result.get("hnsw_built"):
        parts.append(f"HNSW {size_result['hnsw_median_ms']:.2f} ms/query")
        parts.append(f"recall@10 {size_result['recall_at_10_default_ef']:.4f}")
        parts.append(f"recall@100 {size_result['recall_at_100_default_ef']:.4f}")
        parts.append(f"build {size_result['build_s']:.0f} s")
    return ", ".join(parts)


def hnsw_build_estimate_s(results: dict[str, Any], target_count: int) -> Optional[float]:
    """Return target_count divided by the insert rate measured at the largest HNSW size, or None.

    An estimate, not a measurement: the insert rate of HNSW falls as the graph grows (each
    insertion searches a deeper graph), so the true time at ``target_count`` is longer.
    """
    built = [size for size in results["sizes"] if size.get("hnsw_built")]
    if not built:
        return None
    largest = max(built, key=lambda size: size["count"])
    return target_count / largest["build_rate_vectors_per_s"]


def sizes_measured(results: dict[str, Any]) -> Sequence[int]:
    return [size["count"] for size in results["sizes"]]
