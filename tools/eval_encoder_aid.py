"""Measure retrieval quality and speed of ONNX encoders on the AID scene chips.

    .venv/bin/python tools/eval_encoder_aid.py [MODEL.onnx ...] [--aid-dir DIR] [--k 10]

Quality is precision@k of nearest-neighbour retrieval over the 3000 chips (30 classes x 100,
150 x 150 px RGB JPEGs). Every chip queries all the others by cosine similarity, leaving itself
out, and scores the share of its k neighbours that carry its class. Chips are resized to the encoder's input size
with bilinear interpolation (Pillow). Speed is images per second of ``OnnxEncoder.encode`` at
batch 16 on real chips, measured for all models in the same process, alternating between them so
that drift in the machine's speed affects each alike.

AID is for research use only, so the chips are read from the shared data folder and never copied.
With no MODEL arguments the script evaluates the bundled fp32 encoder and, when present, the int8
one beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devimport import REPO_ROOT, import_lookalike

import_lookalike()
from lookalike.core.encoder import OnnxEncoder  # noqa: E402

DEFAULT_AID_DIR = REPO_ROOT.parent / "shared" / "data" / "labelled" / "aid_150px"
DEFAULT_MODELS = (
    REPO_ROOT / "models" / "efficientnet_lite0.onnx",
    REPO_ROOT / "models" / "efficientnet_lite0_int8.onnx",
)
SPEED_BATCH_SIZE = 16
READ_BATCH_SIZE = 64


def read_labels(aid_dir: Path) -> tuple[list[Path], list[str]]:
    with (aid_dir / "labels.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [aid_dir / row["path"] for row in rows], [row["label"] for row in rows]


def read_chips(paths: Sequence[Path], size_px: int) -> np.ndarray:
    """Read RGB images and resize them to ``size_px`` with bilinear interpolation, as uint8 (N, 3, H, W)."""
    from PIL import Image

    chips = []
    for path in paths:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size_px, size_px), Image.BILINEAR)
        chips.append(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
    return np.stack(chips)


def precision_at_k(embeddings: np.ndarray, labels: Sequence[str], k: int) -> np.ndarray:
    """Return each chip's precision@k among all other chips, by cosine similarity."""
    label_ids = np.unique(np.asarray(labels), return_inverse=True)[1]
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, k, axis=1)[:, :k]
    return (label_ids[neighbours] == label_ids[:, None]).mean(axis=1)


def measure_speed(encoders: Sequence[OnnxEncoder], chips: np.ndarray, rounds: int) -> list[float]:
    """Return images per second for each encoder on ``chips``, interleaving the encoders per round."""
    batch = chips[:SPEED_BATCH_SIZE].astype(np.float32)
    for encoder in encoders:
        encoder.encode(batch)  # the first run allocates buffers and is not timed
    elapsed_s = [0.0] * len(encoders)
    for _round in range(rounds):
        for index, encoder in enumerate(encoders):
            start = time.perf_counter()
            encoder.encode(batch)
            elapsed_s[index] += time.perf_counter() - start
    return [rounds * len(batch) / seconds for seconds in elapsed_s]


def describe_machine() -> str:
    import onnxruntime

    cpu_model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu_model}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", type=Path, help="ONNX encoders; the first is the baseline")
    parser.add_argument("--aid-dir", type=Path, default=DEFAULT_AID_DIR, help="folder with labels.csv")
    parser.add_argument("--k", type=int, default=10, help="neighbours scored per query")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--speed-rounds", type=int, default=20, help="timed batches of 16 per model")
    args = parser.parse_args(argv)

    model_paths = args.models or [path for path in DEFAULT_MODELS if path.is_file()]
    encoders = [OnnxEncoder(path, intra_op_threads=args.threads) for path in model_paths]
    sizes = {encoder.spec.input_size_px for encoder in encoders}
    if len(sizes) != 1:
        parser.error(f"the encoders take different input sizes {sorted(sizes)}; compare them separately")
    size_px = sizes.pop()

    paths, labels = read_labels(args.aid_dir)
    embeddings = [np.empty((len(paths), encoder.embedding_dim), np.float32) for encoder in encoders]
    first_chips = None
    for start in range(0, len(paths), READ_BATCH_SIZE):
        chips = read_chips(paths[start : start + READ_BATCH_SIZE], size_px)
        first_chips = chips if first_chips is None else first_chips
        for encoder, table in zip(encoders, embeddings):
            table[start : start + len(chips)] = encoder.encode(chips.astype(np.float32))

    speeds = measure_speed(encoders, first_chips, args.speed_rounds)
    precisions = [precision_at_k(table, labels, args.k) for table in embeddings]

    print(f"machine: {describe_machine()}")
    print(f"chips: {len(paths)} from {args.aid_dir} resized to {size_px} px; k = {args.k}\n")
    names = [encoder.path.name for encoder in encoders]
    print(f"| model | file MB | images/s (batch 16) | speed vs first | precision@{args.k} |")
    print("|---|---|---|---|---|")
    for encoder, speed, precision in zip(encoders, speeds, precisions):
        size_mb = encoder.path.stat().st_size / 1e6
        print(
            f"| {encoder.path.name} | {size_mb:.1f} | {speed:.1f} | {speed / speeds[0]:.2f}x "
            f"| {precision.mean():.4f} |"
        )
    for encoder, table in zip(encoders[1:], embeddings[1:]):
        if encoder.embedding_dim == encoders[0].embedding_dim:
            cosine = np.sum(table * embeddings[0], axis=1)
            print(
                f"\ncosine similarity of {encoder.path.name} to {names[0]} per chip: "
                f"mean {cosine.mean():.4f}, min {cosine.min():.4f}"
            )

    by_class: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    print("\n| class | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label in sorted(by_class):
        rows = by_class[label]
        figures = " | ".join(f"{precision[rows].mean():.2f}" for precision in precisions)
        print(f"| {label} | {figures} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
