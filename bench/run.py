"""Run the benchmarks and write docs/benchmarks.md, its plots and the run's JSON.

    .venv/bin/python bench/run.py [--quick | --full] [--only SECTION ...]
    .venv/bin/python bench/run.py --page-from bench/.cache/runs/full-YYYYMMDDTHHMMSS.json

``scripts/bench.sh`` is the usual entry point. ``--quick`` takes a few minutes on two cores;
``--full`` is the run whose numbers the committed page shows. ``--only`` runs some sections and
writes the page with those alone, for working on one section. ``--page-from`` rewrites the page
and plots from the JSON of an earlier run without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from devimport import import_lookalike

import_lookalike()

from lookalike.bench import memory, report, retrieval, search_bench, throughput  # noqa: E402
from lookalike.bench.common import CACHE_DIR, DOCS_DIR, log  # noqa: E402
from lookalike.bench.datasets import aid_chips, eurosat_chips  # noqa: E402
from lookalike.bench.machine import collect_machine_info  # noqa: E402
from lookalike.core.encoder import MODELS_DIR, default_model_path  # noqa: E402

# Named explicitly: the engine's default encoder is one of the two, and which one may change.
FP32_MODEL_PATH = MODELS_DIR / "efficientnet_lite0.onnx"
INT8_MODEL_PATH = MODELS_DIR / "efficientnet_lite0_int8.onnx"
SECTIONS = ("throughput", "memory", "search", "retrieval")
RUNS_DIR = CACHE_DIR / "runs"


@dataclass(frozen=True)
class Preset:
    """Sizes of every section; ``quick`` checks that everything runs, ``full`` is the published run."""

    name: str
    # None tiles the whole raster.
    throughput_tiles_per_side: Optional[int]
    throughput_overlap_fraction: float
    throughput_rounds: int
    memory_tile_size_source_px: float
    search: search_bench.SearchPreset
    aid_per_class: Optional[int]
    negatives_queries_per_class: int


PRESETS = {
    "quick": Preset(
        name="quick",
        throughput_tiles_per_side=10,
        throughput_overlap_fraction=0.5,
        throughput_rounds=2,
        memory_tile_size_source_px=80.0,
        search=search_bench.SearchPreset(hnsw_sizes=(10_000,), exact_only_sizes=(100_000,), timed_queries=50),
        aid_per_class=10,
        negatives_queries_per_class=3,
    ),
    "full": Preset(
        name="full",
        throughput_tiles_per_side=None,
        throughput_overlap_fraction=0.5,
        # Round ratios on this 2-CPU machine spread by up to 0.3, so the median needs several.
        throughput_rounds=5,
        memory_tile_size_source_px=56.0,
        search=search_bench.SearchPreset(hnsw_sizes=(10_000, 100_000, 1_000_000), exact_only_sizes=(),
                                         timed_queries=100),
        aid_per_class=None,
        negatives_queries_per_class=5,
    ),
}


def encoder_paths() -> list[Path]:
    paths = [FP32_MODEL_PATH]
    if INT8_MODEL_PATH.is_file():
        paths.append(INT8_MODEL_PATH)
    return paths


def not_measured(preset: Preset, sections: tuple[str, ...], encoders: list[Path]) -> list[str]:
    items = []
    if INT8_MODEL_PATH not in encoders:
        items.append(f"The int8 encoder: `models/{INT8_MODEL_PATH.name}` did not exist when this run started.")
    items += [f"Section '{name}': left out of this run with --only." for name in SECTIONS if name not in sections]
    if "search" in sections:
        largest = max(preset.search.hnsw_sizes + preset.search.exact_only_sizes)
        items.append(f"Collections above {largest:,} vectors.")
        items.append("Search latency under concurrent queries, and HNSW parameters other than the engine's "
                      "defaults except ef_search.")
    if "retrieval" in sections:
        items.append("Negatives with the int8 encoder (the negatives study uses the first encoder only).")
        if preset.aid_per_class is not None:
            items.append(f"All of AID: this preset uses the first {preset.aid_per_class} chips of each class.")
    items.append("A GPU execution provider: this machine has none; every figure is CPU-only.")
    return items


def previous_run(preset_name: str, machine: dict[str, Any], before: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """Return the latest complete run of the same preset on the same CPU, older than ``before``, or None."""
    if not RUNS_DIR.is_dir():
        return None
    for path in sorted(RUNS_DIR.glob(f"{preset_name}-*.json"), reverse=True):
        # Run files are named by their UTC start time, so names sort by age.
        if before is not None and path.name >= before.name:
            continue
        run = json.loads(path.read_text())
        same_machine = run["machine"]["cpu_model"] == machine["cpu_model"]
        complete = all(run.get(name) for name in SECTIONS)
        if same_machine and complete:
            return run
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small sizes, a few minutes (default)")
    group.add_argument("--full", action="store_true", help="the published sizes, about 20 minutes on 2 cores")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--output", type=Path, default=DOCS_DIR / "benchmarks.md", help="page to write")
    parser.add_argument("--hnsw-build-budget-s", type=float, metavar="SECONDS",
                        help="skip an HNSW build whose predicted time exceeds this (default "
                             f"{search_bench.HNSW_BUILD_BUDGET_S:g} s)")
    parser.add_argument("--page-from", type=Path, metavar="RUN_JSON",
                        help="write the page from this saved run instead of measuring")
    arguments = parser.parse_args(argv)
    if arguments.page_from is not None:
        saved = json.loads(arguments.page_from.read_text())
        complete = all(saved.get(name) for name in SECTIONS)
        previous = previous_run(saved["preset"], saved["machine"], arguments.page_from) if complete else None
        report.write_page(saved, previous, arguments.output)
        log(f"bench: wrote {arguments.output} from {arguments.page_from}")
        return 0
    preset = PRESETS["full" if arguments.full else "quick"]
    if arguments.hnsw_build_budget_s is not None:
        preset = replace(preset, search=replace(preset.search, hnsw_build_budget_s=arguments.hnsw_build_budget_s))
    sections = tuple(arguments.only or SECTIONS)

    (CACHE_DIR / "scratch").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = collect_machine_info()
    encoders = encoder_paths()
    log(f"bench: preset {preset.name}, sections {', '.join(sections)}, encoders {[path.name for path in encoders]}")
    results: dict[str, Any] = {"preset": preset.name, "preset_values": asdict(preset), "started_at": started_at,
                               "machine": machine, "encoders": [path.name for path in encoders], "section_s": {},
                               "load_average": {}}

    def timed(name: str, run) -> None:
        if name not in sections:
            return
        section_started = time.perf_counter()
        load_before = os.getloadavg()[0]
        results[name] = run()
        results["section_s"][name] = time.perf_counter() - section_started
        # Other processes on the machine slow every timing; the 1-minute load average shows them.
        results["load_average"][name] = [load_before, os.getloadavg()[0]]
        log(f"bench: {name} done in {results['section_s'][name]:.0f} s")

    timed("throughput", lambda: throughput.run(encoders, preset.throughput_tiles_per_side,
                                                   preset.throughput_overlap_fraction, preset.throughput_rounds))
    timed("memory", lambda: memory.run(default_model_path(), preset.memory_tile_size_source_px))
    timed("search", lambda: search_bench.run(encoders[0], preset.search))
    timed("retrieval", lambda: [
        retrieval.run(aid_chips(preset.aid_per_class), encoders, preset.negatives_queries_per_class),
        retrieval.run(eurosat_chips(), encoders, preset.negatives_queries_per_class),
    ])
    results["total_s"] = time.perf_counter() - started
    results["not_measured"] = not_measured(preset, sections, encoders)
    for size in results.get("search", {}).get("sizes", []):
        if size.get("hnsw_skipped_reason"):
            results["not_measured"].append(f"HNSW over {size['count']:,} vectors: {size['hnsw_skipped_reason']}.")

    previous = previous_run(preset.name, machine) if sections == SECTIONS else None
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    run_path = RUNS_DIR / f"{preset.name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    run_path.write_text(json.dumps(results, indent=1, default=str))
    page = report.write_page(results, previous, arguments.output)
    log(f"bench: wrote {page} and {run_path} in {results['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
