"""Build one index in this process and print its peak resident set size as JSON on stdout.

    python bench/memory_worker.py SOURCE INDEX_FOLDER ENCODER_PATH TILE_SIZE_SOURCE_PX

Run by ``bench/memory.py`` in a fresh process per build, because ``ru_maxrss`` is a high-water
mark that never goes down within a process.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from devimport import import_lookalike


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def high_water_mark_mib() -> float:
    """Return VmHWM, the peak RSS of this process's address space since exec, as a cross-check."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    source, index_folder, encoder_path, tile_size_source_px = sys.argv[1:4] + [float(sys.argv[4])]
    at_start_mib = peak_rss_mib()
    import_lookalike()
    import hnswlib  # noqa: F401 - loaded before the first reading so the baseline includes it
    import onnxruntime  # noqa: F401

    from lookalike.core.pipeline import BuildParameters, build_index

    before_build_mib = peak_rss_mib()
    report = build_index(
        BuildParameters(source_paths=(source,), index_folder=index_folder, encoder_path=encoder_path,
                        tile_size_source_px=tile_size_source_px)
    )
    files = json.loads((Path(index_folder) / "manifest.json").read_text())["files"]
    print(json.dumps({
        "peak_rss_at_start_mib": at_start_mib,
        "peak_rss_before_build_mib": before_build_mib,
        "vm_hwm_mib": high_water_mark_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "tiles_total": report.tiles_total,
        "tiles_embedded": report.tiles_embedded,
        "elapsed_s": report.elapsed_s,
        "peak_batches_in_memory": report.peak_batches_in_memory,
        "index_bytes": sum(entry["size_bytes"] for entry in files.values()),
    }))


if __name__ == "__main__":
    main()
