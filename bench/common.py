"""Paths, progress output and timing shared by the benchmark sections."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Git-ignored: cached embeddings, chip mosaics, scratch indexes and the JSON of each run.
CACHE_DIR = REPO_ROOT / "bench" / ".cache"
DOCS_DIR = REPO_ROOT / "docs"
IMAGE_DIR = DOCS_DIR / "img"

_STARTED_AT = time.monotonic()


def log(message: str) -> None:
    """Print a progress line with the seconds since the run started, to stderr."""
    print(f"[{time.monotonic() - _STARTED_AT:7.1f} s] {message}", file=sys.stderr, flush=True)


def median(values) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if not ordered:
        return float("nan")
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2.0
