"""The checkpoint store of an unfinished build: one ``.npz`` chunk per batch in ``<index folder>.partial/``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from . import get_logger
from .errors import SearchIndexError
from .parameters import SKIP_REASONS, PathLike

if TYPE_CHECKING:
    from .tile_reader import _Batch

LOGGER = get_logger("pipeline")

PARTIAL_SUFFIX = ".partial"
PARTIAL_MARKER_NAME = "partial_build.json"
PARTIAL_FORMAT = "lookalike-partial-build"
CHUNK_PREFIX = "chunk_"
CHUNK_SUFFIX = ".npz"

# Raise when the marker or chunk layout changes, so checkpoints of an older layout are discarded.
PARTIAL_FORMAT_VERSION = 1


# -- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    start_position: int
    end_position: int
    source_positions: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    embeddings: np.ndarray
    skipped: np.ndarray


class _PartialBuild:
    """The ``<index>.partial/`` folder: a marker with the build id and one chunk per batch."""

    def __init__(self, folder: Path, build_id: str) -> None:
        self.folder = folder
        self.build_id = build_id

    @classmethod
    def open_or_create(cls, folder: Path, build_id: str) -> _PartialBuild:
        """Reuse a checkpoint folder of the same build, or start a new one.

        A checkpoint folder of a different build (other parameters, sources or encoder) is
        removed. A folder at that path without the marker file is not ours and is never touched.
        """
        marker = folder / PARTIAL_MARKER_NAME
        if folder.exists():
            stored_id = _read_partial_marker(marker)
            if stored_id is None:
                raise SearchIndexError(
                    f"{folder} exists but is not a Lookalike checkpoint folder ({PARTIAL_MARKER_NAME} is "
                    "missing); move it away or choose another index folder."
                )
            if stored_id == build_id:
                return cls(folder, build_id)
            LOGGER.warning("Discarding the checkpoints in %s: they belong to a build with other parameters, "
                           "sources or encoder, so their tiles are read again", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_atomically(
            marker,
            json.dumps({"format": PARTIAL_FORMAT, "format_version": PARTIAL_FORMAT_VERSION,
                        "build_id": build_id}).encode("utf-8"),
        )
        return cls(folder, build_id)

    def chunk_paths(self) -> list[Path]:
        return sorted(self.folder.glob(f"{CHUNK_PREFIX}*{CHUNK_SUFFIX}"))

    def load_chunks(self) -> Iterator[_Chunk]:
        """Yield the chunks in tile order; stops at a gap, so only a contiguous prefix counts."""
        expected_start = 0
        for path in self.chunk_paths():
            chunk = _read_chunk(path)
            if chunk is None or chunk.start_position != expected_start:
                LOGGER.warning("Ignoring checkpoint %s and those after it: it does not continue at tile %d",
                               path, expected_start)
                return
            yield chunk
            expected_start = chunk.end_position

    def resume_state(self, n_sources: int) -> tuple[int, int, np.ndarray]:
        """Return the next tile position, the tiles embedded so far and the skip counts so far."""
        position = 0
        embedded = 0
        skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)
        for chunk in self.load_chunks():
            position = chunk.end_position
            embedded += len(chunk.rows)
            skipped += chunk.skipped
        return position, embedded, skipped

    def write_chunk(self, batch: _Batch, embeddings: np.ndarray) -> None:
        count = batch.count
        path = self.folder / f"{CHUNK_PREFIX}{batch.start_position:012d}{CHUNK_SUFFIX}"
        temp_path = path.with_name(path.name + ".tmp")
        with open(temp_path, "wb") as stream:
            np.savez(
                stream,
                positions=np.array([batch.start_position, batch.end_position], dtype=np.int64),
                source_positions=batch.source_positions[:count],
                rows=batch.rows[:count],
                cols=batch.cols[:count],
                embeddings=embeddings.astype(np.float32, copy=False),
                skipped=batch.skipped,
            )
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=False)


def _read_partial_marker(marker: Path) -> Optional[str]:
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != PARTIAL_FORMAT:
        return None
    return str(content.get("build_id", ""))


def _read_chunk(path: Path) -> Optional[_Chunk]:
    try:
        with np.load(path, allow_pickle=False) as data:
            start, end = (int(value) for value in data["positions"])
            return _Chunk(
                start_position=start,
                end_position=end,
                source_positions=data["source_positions"],
                rows=data["rows"],
                cols=data["cols"],
                embeddings=data["embeddings"],
                skipped=data["skipped"],
            )
    except (OSError, ValueError, KeyError) as error:
        LOGGER.warning("Checkpoint %s cannot be read (%s); its tiles are read again", path, error)
        return None


def _write_atomically(path: Path, content: bytes) -> None:
    temp_path = path.with_name(path.name + ".tmp")
    with open(temp_path, "wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp_path, path)


def partial_folder_for(index_folder: PathLike) -> Path:
    """Return the checkpoint folder of a build into ``index_folder``: ``<index_folder>.partial``."""
    folder = Path(index_folder)
    return folder.with_name(folder.name + PARTIAL_SUFFIX)
