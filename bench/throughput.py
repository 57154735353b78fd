"""Throughput: tiles per second of ``build_index`` against ``OnnxEncoder.encode`` on the same chips.

The pipeline figure is wall time around the whole ``build_index`` call: opening the encoder,
planning the grid and value stretch, reading and warping chips, encoding, checkpointing every
batch and committing the HNSW index. The bare-encoder figure encodes the very chips the build
embedded, read beforehand with the index's grid and stretch, at the same batch size. The two
alternate round by round, and which runs first flips every round, so that a steady drift in
machine speed favours neither.

Both are also timed in CPU seconds of this process (all threads), which other processes on the
machine barely change. A pipeline that only waits longer shows in wall time alone, and one that
does more work per tile shows in both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lookalike.core.encoder import OnnxEncoder, default_model_path
from lookalike.core.grid import TileGrid
from lookalike.core.index import TileIndex
from lookalike.core.pipeline import BuildParameters, Region, build_index
from lookalike.core.raster import RasterSource

from .common import CACHE_DIR, log, median
from .datasets import PIPELINE_RASTER

BATCH_SIZE = 32
# Tiles of 32 px of the 5 m NAIP scene, upsampled to the encoder's 224 px. Given explicitly so
# that the tile count does not follow changes to the pipeline's default tile size.
TILE_GROUND_SIZE_M = 160.0
# Thousands of tiles, so that what a build pays once (opening the encoder, planning, the HNSW
# commit and save) weighs on the rate as little as in real builds of whole scenes.


def extent_of_tiles(raster_path: Path, tiles_per_side: int, tile_ground_size_m: float) -> Region:
    """Return a square region at the raster's top-left corner, ``tiles_per_side`` tiles wide."""
    source = RasterSource(str(raster_path))
    try:
        xmin, _, _, ymax = source.bounds
        crs_wkt = source.crs_wkt
    finally:
        source.close()
    side_m = tiles_per_side * tile_ground_size_m
    # Inset by a millimetre so that tiles that only touch the region's edges are not selected.
    return Region(crs_wkt=crs_wkt, bounds=(xmin, ymax - side_m + 1e-3, xmin + side_m - 1e-3, ymax))


def read_index_chips(index: TileIndex) -> tuple[np.ndarray, float]:
    """Read the chips of every tile in the index, as the build read them; return them and the seconds."""
    source_record = index.sources[0]
    grid = TileGrid.from_dict(source_record["grid"])
    source = RasterSource(source_record["path"], source_record["band_indexes"])
    table = index.tile_table
    chips = np.empty((index.count, len(source.band_indexes), grid.tile_size_px, grid.tile_size_px), np.float32)
    # Touch every page first: the first write to a fresh page costs a page fault, which on this
    # virtual machine made a copy into a 1.5 GB array take longer than the reads themselves.
    chips.fill(0.0)
    started = time.perf_counter()
    try:
        for position, tile in enumerate(table):
            bounds = grid.tile_bounds(int(tile["row"]), int(tile["col"]))
            chips[position], _ = source.read_chip(bounds, grid.crs_wkt, grid.tile_size_px,
                                                  source_record["value_stretch"])
    finally:
        source.close()
    return chips, time.perf_counter() - started


def _build_once(params: BuildParameters) -> dict[str, Any]:
    started = time.perf_counter()
    cpu_started = time.process_time()
    report = build_index(params)
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "cpu_ms_per_tile": cpu_s * 1000.0 / report.tiles_embedded,
        "tiles_embedded": report.tiles_embedded,
        "tiles_total": report.tiles_total,
        "tiles_per_s": report.tiles_embedded / wall_s,
        "report_rate_tiles_per_s": report.rate_tiles_per_s,
        "peak_batches_in_memory": report.peak_batches_in_memory,
    }


def encode_in_batches(encoder: OnnxEncoder, chips: np.ndarray) -> np.ndarray:
    """Encode ``chips`` one batch at a time, as the pipeline hands them to the encoder."""
    return np.concatenate([encoder.encode(chips[start : start + BATCH_SIZE])
                           for start in range(0, len(chips), BATCH_SIZE)])


def measure_encoder(encoder_path: Path, tiles_per_side: Optional[int], overlap_fraction: float, rounds: int,
                    workdir: Path, encoder_threads: Optional[int] = None) -> dict[str, Any]:
    """Measure pipeline and bare-encoder throughput for one encoder over ``rounds`` alternating rounds.

    ``encoder_threads`` sets onnxruntime's thread count for both. None leaves its default.
    """
    encoder = OnnxEncoder(encoder_path, batch_size=BATCH_SIZE, intra_op_threads=encoder_threads)
    tile_ground_size_m = TILE_GROUND_SIZE_M
    extent = None if tiles_per_side is None else extent_of_tiles(PIPELINE_RASTER, tiles_per_side, tile_ground_size_m)

    def parameters(round_number: int) -> BuildParameters:
        return BuildParameters(
            source_paths=(str(PIPELINE_RASTER),),
            index_folder=str(workdir / f"{encoder_path.stem}_{encoder_threads or 'default'}_{round_number}"),
            encoder_path=str(encoder_path),
            encoder_threads=encoder_threads,
            tile_ground_size_m=tile_ground_size_m,
            overlap_fraction=overlap_fraction,
            extent=extent,
            batch_size=BATCH_SIZE,
        )

    # A first build provides the chips for the bare encoder and warms the page cache and GDAL.
    warm_up = _build_once(parameters(0))
    index = TileIndex.open(parameters(0).index_folder)
    chips, read_s = read_index_chips(index)
    stored = np.asarray(index.embeddings, dtype=np.float32)
    encoder.encode(chips[:BATCH_SIZE])  # the first run allocates onnxruntime's buffers
    # build_index opens its own encoder, a fixed cost per build that the bare figure does not pay.
    started = time.perf_counter()
    OnnxEncoder(encoder_path, batch_size=BATCH_SIZE, intra_op_threads=encoder_threads)
    encoder_open_s = time.perf_counter() - started

    def bare_run() -> tuple[dict[str, Any], np.ndarray]:
        started = time.perf_counter()
        cpu_started = time.process_time()
        embeddings = encode_in_batches(encoder, chips)
        bare_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        return {"wall_s": bare_s, "tiles_per_s": chips.shape[0] / bare_s, "cpu_s": cpu_s,
                "cpu_ms_per_tile": cpu_s * 1000.0 / chips.shape[0]}, embeddings

    pipeline_runs = []
    bare_runs = []
    for round_number in range(1, rounds + 1):
        # The order flips every round (bare first, then pipeline first), so that a machine
        # that slows or speeds up steadily favours neither side.
        pipeline_first = round_number % 2 == 0
        if pipeline_first:
            pipeline_runs.append(_build_once(parameters(round_number)))
        bare, bare_embeddings = bare_run()
        bare_runs.append(bare)
        if not pipeline_first:
            pipeline_runs.append(_build_once(parameters(round_number)))
        shutil.rmtree(parameters(round_number).index_folder, ignore_errors=True)
        log(f"throughput: {encoder.name} round {round_number}: bare {bare_runs[-1]['tiles_per_s']:.1f} tiles/s, "
            f"pipeline {pipeline_runs[-1]['tiles_per_s']:.1f} tiles/s")

    ratios = [pipeline["tiles_per_s"] / bare["tiles_per_s"] for pipeline, bare in zip(pipeline_runs, bare_runs)]
    # Bare CPU time over pipeline CPU time per tile, so that 1 means no extra work, like the wall-time ratio.
    cpu_ratios = [bare["cpu_ms_per_tile"] / pipeline["cpu_ms_per_tile"]
                  for pipeline, bare in zip(pipeline_runs, bare_runs)]
    return {
        "encoder": encoder.name,
        "encoder_file": encoder_path.name,
        "encoder_threads": encoder_threads,
        "execution_provider": encoder.execution_provider,
        "tiles": int(chips.shape[0]),
        "tiles_in_extent": warm_up["tiles_total"],
        "tile_ground_size_m": tile_ground_size_m,
        "overlap_fraction": overlap_fraction,
        "batch_size": BATCH_SIZE,
        "read_only_tiles_per_s": chips.shape[0] / read_s,
        "encoder_open_s": encoder_open_s,
        "max_abs_difference_to_index": float(np.abs(bare_embeddings - stored).max()),
        "bare_runs": bare_runs,
        "pipeline_runs": pipeline_runs,
        "ratios": ratios,
        "bare_tiles_per_s": median([run["tiles_per_s"] for run in bare_runs]),
        "pipeline_tiles_per_s": median([run["tiles_per_s"] for run in pipeline_runs]),
        "ratio": median(ratios),
        "cpu_ratios": cpu_ratios,
        "cpu_ratio": median(cpu_ratios),
        "bare_cpu_ms_per_tile": median([run["cpu_ms_per_tile"] for run in bare_runs]),
        "pipeline_cpu_ms_per_tile": median([run["cpu_ms_per_tile"] for run in pipeline_runs]),
    }


def usable_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run(encoder_paths: Sequence[Path], tiles_per_side: Optional[int], overlap_fraction: float,
        rounds: int) -> dict[str, Any]:
    """Measure every encoder; return the raster, the tile count and one result per encoder.

    ``tiles_per_side`` None tiles the whole raster. With two or more usable CPUs the engine's
    default encoder is measured once more on one thread fewer than the CPUs, both bare and in
    the pipeline, which leaves a core to the tile reader (``spare_core``).
    """
    workdir = Path(tempfile.mkdtemp(prefix="throughput_", dir=CACHE_DIR / "scratch"))
    spare_core = None
    try:
        results = [measure_encoder(path, tiles_per_side, overlap_fraction, rounds, workdir) for path in encoder_paths]
        cpu_count = usable_cpu_count()
        if cpu_count >= 2:
            spare_core = measure_encoder(default_model_path(), tiles_per_side, overlap_fraction, rounds, workdir,
                                         encoder_threads=cpu_count - 1)
            spare_core["cpu_count"] = cpu_count
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "raster": str(PIPELINE_RASTER.relative_to(PIPELINE_RASTER.parents[2])),
        "tiles_per_side": tiles_per_side,
        "overlap_fraction": overlap_fraction,
        "rounds": rounds,
        "encoders": results,
        "spare_core": spare_core,
    }
