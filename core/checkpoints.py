"""The checkpoint store of an unfinished build: one ``.npz`` chunk per batch in ``<index folder>.partial/``."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import threading
import zipfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from . import get_logger
from .errors import GridError, OtherBuildCheckpointsError, SearchIndexError
from .grid import TileGrid
from .parameters import SKIP_REASONS, PathLike

LOGGER = get_logger("pipeline")

PARTIAL_SUFFIX = ".partial"
PARTIAL_MARKER_NAME = "partial_build.json"
PARTIAL_FORMAT = "lookalike-partial-build"
CHUNK_PREFIX = "chunk_"
CHUNK_SUFFIX = ".npz"

# Raise when the marker or chunk layout changes, so checkpoints of an older layout are discarded.
PARTIAL_FORMAT_VERSION = 1

# Chunks handed to the writer thread and not yet on disk. Two let the encoder run on while one
# chunk waits for fsync. A build stopped by a crash repeats at most these batches when resumed.
MAX_PENDING_CHUNKS = 2


# -- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """The tiles of positions ``[start_position, end_position)``: the embedded ones and the skip counts.

    ``embeddings`` is None when the chunk was loaded without them.
    """

    start_position: int
    end_position: int
    source_positions: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    embeddings: Optional[np.ndarray]
    skipped: np.ndarray


@dataclass(frozen=True)
class _ChunkLayout:
    """Limits on the chunks of one build, for checking chunks read back from disk.

    ``grid_shapes`` contains each source's ``(n_rows, n_cols)``, in source position order.
    ``selected_tiles`` contains, per source, ``row * n_cols + col`` of the tiles read in reading
    order when only some are (an extent of polygons), or None when every tile of the grid is read.
    """

    tiles_total: int
    grid_shapes: tuple[tuple[int, int], ...]
    embedding_dim: int
    selected_tiles: tuple[Optional[np.ndarray], ...]

    def tile_positions(self, source_positions: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Return each tile's position in the build's reading order, or -1 for a tile the build does not read."""
        offsets = self._source_offsets
        n_cols = np.asarray([n_cols for _, n_cols in self.grid_shapes], dtype=np.int64)
        linear = rows.astype(np.int64) * n_cols[source_positions] + cols
        positions = offsets[source_positions] + linear
        for source, selected in enumerate(self.selected_tiles):
            in_source = source_positions == source
            if selected is None or not in_source.any():
                continue
            if len(selected) == 0:
                positions[in_source] = -1
                continue
            sorter = self._sorters[source]
            found_at = np.minimum(np.searchsorted(selected, linear[in_source], sorter=sorter), len(selected) - 1)
            index = sorter[found_at]
            positions[in_source] = np.where(selected[index] == linear[in_source], offsets[source] + index, -1)
        return positions

    @functools.cached_property
    def _source_offsets(self) -> np.ndarray:
        """Position of each source's first tile in the build's reading order."""
        counts = [n_rows * n_cols if selected is None else len(selected)
                  for (n_rows, n_cols), selected in zip(self.grid_shapes, self.selected_tiles)]
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    @functools.cached_property
    def _sorters(self) -> list[Optional[np.ndarray]]:
        return [None if selected is None else np.argsort(selected, kind="stable") for selected in self.selected_tiles]


class _PartialBuild:
    """The ``<index>.partial/`` folder: a marker with the build id and one chunk per batch.

    With a ``layout``, chunks whose tiles, counts or embeddings do not fit the build are
    treated as damaged when read.
    """

    def __init__(self, folder: Path, build_id: str, layout: Optional[_ChunkLayout] = None) -> None:
        self.folder = folder
        self.build_id = build_id
        self.layout = layout
        # True when checkpoints of another build were in the folder and were removed.
        self.discarded_other_build = False
        # Chunk files that resume_state removed because they were damaged or followed a gap.
        self.discarded_chunk_count = 0

    @classmethod
    def open_or_create(
        cls,
        folder: Path,
        build_id: str,
        layout: Optional[_ChunkLayout] = None,
        settings: Optional[Mapping[str, Any]] = None,
        discard_other_build: bool = False,
    ) -> _PartialBuild:
        """Reuse a checkpoint folder of the same build, or start a new one.

        ``settings`` are recorded in the marker, so that a later build with other settings can
        name the ones that differ. A checkpoint folder of a different build is removed only with
        ``discard_other_build``. Otherwise OtherBuildCheckpointsError names the differences,
        because those tiles may have taken hours to embed. A folder at that path without the
        marker file is not ours and is never touched, unless it is empty or contains nothing but
        the marker's temporary file, as a run stopped while creating it leaves it.
        """
        marker = folder / PARTIAL_MARKER_NAME
        if _is_unstarted(folder):
            LOGGER.info("Removing %s: a run stopped while creating it", folder)
            shutil.rmtree(folder)
        discarded = False
        if folder.exists():
            stored = _read_partial_marker(marker)
            if stored is None:
                state = "unreadable" if marker.exists() else "missing"
                raise SearchIndexError(
                    f"{folder} exists but is not a Lookalike checkpoint folder ({PARTIAL_MARKER_NAME} is "
                    f"{state}); move it away or choose another index folder."
                )
            if stored["build_id"] == build_id:
                return cls(folder, build_id, layout)
            if not discard_other_build:
                raise _other_build_error(cls(folder, str(stored["build_id"])), stored.get("settings"), settings)
            LOGGER.warning("Discarding the checkpoints in %s: they belong to a build with other parameters, "
                           "sources or encoder, so their tiles are read again", folder)
            shutil.rmtree(folder)
            discarded = True
        folder.mkdir(parents=True)
        content = {"format": PARTIAL_FORMAT, "format_version": PARTIAL_FORMAT_VERSION, "build_id": build_id}
        if settings is not None:
            content["settings"] = settings
        _write_atomically(marker, json.dumps(content, default=str).encode("utf-8"))
        partial = cls(folder, build_id, layout)
        partial.discarded_other_build = discarded
        return partial

    def tiles_done(self) -> Optional[int]:
        """Return the tile position where the checkpoints end, reading only the last chunk; None if unreadable."""
        paths = self.chunk_paths()
        if not paths:
            return 0
        chunk = _read_chunk(paths[-1], with_embeddings=False)
        return None if chunk is None else chunk.end_position

    def chunk_paths(self) -> list[Path]:
        return sorted(self.folder.glob(f"{CHUNK_PREFIX}*{CHUNK_SUFFIX}"))

    def load_chunks(self, with_embeddings: bool = True) -> Iterator[_Chunk]:
        """Yield the chunks in tile order; stops at a gap, so only a contiguous prefix counts."""
        expected_start = 0
        for path in self.chunk_paths():
            chunk = _read_chunk(path, with_embeddings, self.layout)
            if chunk is None:
                return
            if chunk.start_position != expected_start:
                LOGGER.warning("Ignoring checkpoint %s and those after it: it does not continue at tile %d",
                               path, expected_start)
                return
            yield chunk
            expected_start = chunk.end_position

    def resume_state(self, n_sources: int) -> tuple[int, int, np.ndarray]:
        """Return the next tile position, the tiles embedded so far and the skip counts so far.

        Chunk files after the first damaged or missing chunk are removed.
        """
        position = 0
        embedded = 0
        skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)
        # Embeddings are read too, so that a damaged chunk and those after it are embedded again.
        resumable_paths = set()
        for chunk in self.load_chunks():
            position = chunk.end_position
            embedded += len(chunk.rows)
            skipped += chunk.skipped
            resumable_paths.add(self.chunk_path(chunk.start_position))
        # Chunks after a gap are embedded again, maybe in other batches, so the old ones would
        # break the order of the new ones.
        for path in self.chunk_paths():
            if path not in resumable_paths:
                _remove_path(path)
                self.discarded_chunk_count += 1
        return position, embedded, skipped

    def chunk_path(self, start_position: int) -> Path:
        return self.folder / f"{CHUNK_PREFIX}{start_position:012d}{CHUNK_SUFFIX}"

    def write_chunk(self, chunk: _Chunk) -> None:
        path = self.chunk_path(chunk.start_position)
        temp_path = path.with_name(path.name + ".tmp")
        # Built in memory (a batch is a few hundred KiB) and written in one call, so that a full
        # disk raises from the write alone, not from inside a half-written zip file.
        content = io.BytesIO()
        np.savez(
            content,
            positions=np.array([chunk.start_position, chunk.end_position], dtype=np.int64),
            source_positions=chunk.source_positions,
            rows=chunk.rows,
            cols=chunk.cols,
            embeddings=np.asarray(chunk.embeddings, dtype=np.float32),
            skipped=chunk.skipped,
        )
        try:
            with open(temp_path, "wb") as stream:
                stream.write(content.getbuffer())
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp_path, path)
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        """Delete the folder, its marker last, so that a run stopped midway leaves a folder still marked as ours."""
        marker = self.folder / PARTIAL_MARKER_NAME
        for entry in self.folder.iterdir():
            if entry != marker:
                _remove_path(entry)
        marker.unlink(missing_ok=True)
        self.folder.rmdir()


class _ChunkWriter:
    """Writes chunks in order on one background thread, so that encoding does not wait for fsync.

    At most ``MAX_PENDING_CHUNKS`` chunks wait at any time. A write error is raised by the
    next ``write`` or by ``finish``, which also waits until every chunk is on disk.
    """

    def __init__(self, partial: _PartialBuild) -> None:
        self._partial = partial
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookalike-checkpoints")
        self._pending: deque[Future[None]] = deque()
        self._failed = threading.Event()

    def write(self, chunk: _Chunk) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING_CHUNKS):
            self._wait(self._pending.popleft())
        self._pending.append(self._executor.submit(self._write_unless_failed, chunk))

    def _wait(self, pending: Future[None]) -> None:
        try:
            pending.result()
        except OSError as error:
            raise SearchIndexError(
                f"writing a checkpoint into {self._partial.folder} failed: {error}. Free disk space or fix the "
                "folder's permissions, then run the build again to continue from the checkpoints written so far."
            ) from error

    def _write_unless_failed(self, chunk: _Chunk) -> None:
        # Once a chunk failed, the chunks queued behind it are dropped: on disk they would sit
        # after a gap, where no resume can use them.
        if self._failed.is_set():
            return
        try:
            self._partial.write_chunk(chunk)
        except BaseException:
            self._failed.set()
            raise

    def finish(self) -> None:
        """Wait for every chunk; raise the first write error."""
        try:
            while self._pending:
                self._wait(self._pending.popleft())
        finally:
            self._executor.shutdown(wait=True)


def _remove_path(path: Path) -> None:
    """Delete a file, a symbolic link (not its target) or a folder with its contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def is_checkpoint_folder(folder: Path) -> bool:
    """Tell whether ``folder`` is the checkpoint folder (``<index>.partial``) of a build."""
    return folder.is_dir() and _read_partial_marker(folder / PARTIAL_MARKER_NAME) is not None


def _read_partial_marker(marker: Path) -> Optional[dict[str, Any]]:
    """Return the marker's content with its ``build_id`` as a string, or None when it is not our marker."""
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != PARTIAL_FORMAT:
        return None
    return {**content, "build_id": str(content.get("build_id", ""))}


def _other_build_error(
    other: _PartialBuild, stored_settings: Any, settings: Optional[Mapping[str, Any]]
) -> OtherBuildCheckpointsError:
    """Return the error for a build that would discard the checkpoints of ``other``."""
    changes: list[str] = []
    if isinstance(stored_settings, dict) and settings is not None:
        try:
            changes = describe_settings_changes(stored_settings, settings)
        except (AttributeError, TypeError, ValueError):
            # A marker edited by hand: the build ids still differ, only the details are lost.
            changes = []
    # Markers written before the settings were recorded have none to compare.
    differences = f"it differs in {'; '.join(changes)}" if changes else "its parameters, rasters or encoder differ"
    tiles_done = other.tiles_done()
    covered = f" (they cover {tiles_done} tiles)" if tiles_done else ""
    finish = "To finish that build, run it again with its settings."
    if any(change.endswith(RASTER_CHANGED_SUFFIX) for change in changes):
        finish = "That build can be finished only with its rasters as they were."
    message = (
        f"{other.folder} contains the finished tiles of an interrupted build with other settings than this "
        f"one{covered}: {differences}. {finish} To start this build instead, set discard_other_checkpoints, "
        f"which deletes those tiles, or delete {other.folder}."
    )
    return OtherBuildCheckpointsError(message, str(other.folder), tiles_done, changes)


# Ends the description of a raster whose content changed since the interrupted build read it.
RASTER_CHANGED_SUFFIX = ", which changed since"


def describe_settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Name, in an analyst's words, each setting in which two ``planning._build_settings`` dicts differ."""
    changes = []
    if old.get("encoder_checksum") != new.get("encoder_checksum"):
        changes.append("the encoder")
    old_sources = old.get("sources") or []
    new_sources = new.get("sources") or []
    old_paths = [source.get("path") for source in old_sources]
    new_paths = [source.get("path") for source in new_sources]
    if old_paths != new_paths:
        changes.append(f"the rasters (it indexed {', '.join(map(str, old_paths))})")
    else:
        for old_source, new_source in zip(old_sources, new_sources):
            changes.extend(_source_changes(old_source, new_source))
    if old.get("extent") != new.get("extent"):
        changes.append("the extent")
    if old.get("min_valid_fraction") != new.get("min_valid_fraction"):
        changes.append(f"the minimum valid fraction (it used {old.get('min_valid_fraction')})")
    if old.get("add_to_existing") != new.get("add_to_existing"):
        changes.append("adding to the existing index" if old.get("add_to_existing") else "building a new index")
    # A new extent changes both the extent and each source's tile selection.
    return list(dict.fromkeys(changes)) or ["the format of the checkpoints or a setting this version cannot name"]


def _source_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    name = os.path.basename(str(new.get("path")))
    changes = []
    if old.get("checksum") != new.get("checksum"):
        changes.append(f"the file {name} itself{RASTER_CHANGED_SUFFIX}")
    bands_changed = old.get("band_indexes") != new.get("band_indexes")
    if bands_changed:
        changes.append(f"the bands of {name} (it read {old.get('band_indexes')}, now {new.get('band_indexes')})")
    old_grid = old.get("grid") or {}
    new_grid = new.get("grid") or {}
    old_size_m = _tile_ground_size_m(old_grid)
    new_size_m = _tile_ground_size_m(new_grid)
    if old_grid.get("gsd") != new_grid.get("gsd") or old_grid.get("tile_size_px") != new_grid.get("tile_size_px"):
        sizes = (f" ({_metres_text(old_size_m)} on the ground then, {_metres_text(new_size_m)} now)"
                 if old_size_m is not None and new_size_m is not None else "")
        changes.append(f"the tile size or GSD{sizes}")
    elif old_grid.get("stride_px") != new_grid.get("stride_px"):
        changes.append("the overlap")
    if old.get("mask") != new.get("mask"):
        changes.append("the mask")
    if old.get("selected_tiles") != new.get("selected_tiles"):
        changes.append("the extent")
    elif old.get("stretch") != new.get("stretch") and old.get("checksum") == new.get("checksum") and not bands_changed:
        # Other bands or a changed file bring their own stretch, which is named with them.
        changes.append(f"the value stretch of {name}")
    return changes


def _metres_text(metres: float) -> str:
    return f"{metres:,.0f} m" if metres >= 10 else f"{metres:.2g} m"


def _tile_ground_size_m(grid_record: Mapping[str, Any]) -> Optional[float]:
    try:
        grid = TileGrid.from_dict(grid_record)
    except (GridError, KeyError, TypeError, ValueError):
        return None
    return grid.gsd * grid.tile_size_px / grid.units_per_metre


def _read_chunk(path: Path, with_embeddings: bool = True, layout: Optional[_ChunkLayout] = None) -> Optional[_Chunk]:
    try:
        with open(path, "rb") as stream:
            if not zipfile.is_zipfile(stream):
                LOGGER.warning("Checkpoint %s is not an .npz file (damaged or cut short); its tiles and those "
                               "after it are read again", path)
                return None
            stream.seek(0)
            with np.load(stream, allow_pickle=False) as data:
                positions = data["positions"]
                if not (isinstance(positions, np.ndarray) and np.issubdtype(positions.dtype, np.integer)
                        and positions.shape == (2,)):
                    LOGGER.warning("Checkpoint %s is damaged (its positions are not two integers); its tiles "
                                   "and those after it are read again", path)
                    return None
                start, end = (int(value) for value in positions)
                chunk = _Chunk(
                    start_position=start,
                    end_position=end,
                    source_positions=data["source_positions"],
                    rows=data["rows"],
                    cols=data["cols"],
                    # An npz member is read only when asked for, so counting skips the embeddings.
                    embeddings=data["embeddings"] if with_embeddings else None,
                    skipped=data["skipped"],
                )
    except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, NotImplementedError, zlib.error,
            zipfile.BadZipFile) as error:
        # Damaged zip headers surface as any of these (an unknown compression method raises
        # NotImplementedError, a set encryption flag RuntimeError).
        LOGGER.warning("Checkpoint %s cannot be read (%s); its tiles and those after it are read again", path, error)
        return None
    problem = _chunk_problem(chunk, layout)
    if problem is not None:
        LOGGER.warning("Checkpoint %s is damaged (%s); its tiles and those after it are read again", path, problem)
        return None
    return chunk


def _chunk_problem(chunk: _Chunk, layout: Optional[_ChunkLayout]) -> Optional[str]:
    """Say what is wrong with the members of a chunk read from disk, or return None.

    The zip format's checksums catch damaged bytes. These checks catch members that are whole
    but cannot belong to the build, because such a member would stop every commit or put wrong
    tiles into the index.
    """
    # np.load hands back the raw bytes of a member that is not an .npy array.
    members = {"source_positions": chunk.source_positions, "rows": chunk.rows, "cols": chunk.cols,
               "skipped": chunk.skipped}
    for name, values in members.items():
        if not isinstance(values, np.ndarray) or not np.issubdtype(values.dtype, np.integer):
            return f"{name} is not an integer array"
    tile_count = len(chunk.rows) if chunk.rows.ndim == 1 else -1
    if tile_count < 0 or chunk.source_positions.shape != (tile_count,) or chunk.cols.shape != (tile_count,):
        return "rows, cols and source positions are not lists of one length"
    if chunk.skipped.ndim != 2 or chunk.skipped.shape[1] != len(SKIP_REASONS) or (chunk.skipped < 0).any():
        return f"skip counts of shape {chunk.skipped.shape} or below zero"
    if not 0 <= chunk.start_position <= chunk.end_position:
        return f"positions {chunk.start_position} to {chunk.end_position}"
    if chunk.end_position - chunk.start_position != tile_count + int(chunk.skipped.sum()):
        return (f"positions {chunk.start_position} to {chunk.end_position} do not match {tile_count} tiles "
                f"and {int(chunk.skipped.sum())} skipped")
    if (chunk.rows < 0).any() or (chunk.cols < 0).any() or (chunk.source_positions < 0).any():
        return "a row, column or source position below zero"
    embeddings = chunk.embeddings
    if embeddings is not None:
        if not isinstance(embeddings, np.ndarray) or not np.issubdtype(embeddings.dtype, np.floating):
            return "embeddings are not a floating-point array"
        if embeddings.ndim != 2 or len(embeddings) != tile_count:
            return f"embeddings of shape {embeddings.shape} for {tile_count} tiles"
        if not np.isfinite(embeddings).all() or not np.any(embeddings != 0, axis=1).all():
            return "embeddings with non-finite values or all zeros"
    if layout is None:
        return None
    if chunk.end_position > layout.tiles_total:
        return f"positions up to {chunk.end_position} in a build of {layout.tiles_total} tiles"
    if chunk.skipped.shape[0] != len(layout.grid_shapes):
        return f"skip counts for {chunk.skipped.shape[0]} sources in a build of {len(layout.grid_shapes)}"
    if embeddings is not None and embeddings.shape[1] != layout.embedding_dim:
        return f"{embeddings.shape[1]}-dim embeddings from a {layout.embedding_dim}-dim encoder"
    if tile_count and chunk.source_positions.max() >= len(layout.grid_shapes):
        return f"source position {int(chunk.source_positions.max())} in a build of {len(layout.grid_shapes)}"
    shapes = np.asarray(layout.grid_shapes, dtype=np.int64).reshape(-1, 2)[chunk.source_positions]
    if (chunk.rows >= shapes[:, 0]).any() or (chunk.cols >= shapes[:, 1]).any():
        return "a tile outside its source's grid"
    # Each tile has one position in the build's reading order, which must lie in the chunk's
    # range and increase from tile to tile.
    positions = layout.tile_positions(chunk.source_positions, chunk.rows, chunk.cols)
    if ((positions < chunk.start_position) | (positions >= chunk.end_position)).any():
        return f"tiles that do not belong to positions {chunk.start_position} to {chunk.end_position}"
    if (np.diff(positions) <= 0).any():
        return "tiles out of reading order"
    return None


def _is_unstarted(folder: Path) -> bool:
    """Tell whether ``folder`` is a directory that is empty or contains only the marker's temporary file."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return [entry.name for entry in folder.iterdir()] in ([], [PARTIAL_MARKER_NAME + ".tmp"])


def _write_atomically(path: Path, content: bytes) -> None:
    temp_path = path.with_name(path.name + ".tmp")
    with open(temp_path, "wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp_path, path)


def partial_folder_for(index_folder: PathLike) -> Path:
    """Return the checkpoint folder of a build into ``index_folder``: ``<index_folder>.partial``."""
    # Resolved like the lock's path, so every spelling of one folder (".", "sub/..", a symbolic
    # link) finds the same checkpoints.
    folder = Path(os.path.realpath(os.fspath(index_folder)))
    return folder.with_name(folder.name + PARTIAL_SUFFIX)


def index_folder_of_checkpoint_name(path: PathLike) -> Optional[Path]:
    """Return the existing folder whose builds would keep their checkpoints at ``path`` or above it, or None.

    That is ``<folder>.partial`` beside ``<folder>``. A build stops when that path is taken by a
    folder that is not its checkpoints, so other outputs must not be written there or inside it.
    """
    resolved = Path(os.path.realpath(os.fspath(path)))
    for place in (resolved, *resolved.parents):
        if not place.name.endswith(PARTIAL_SUFFIX) or place.name == PARTIAL_SUFFIX:
            continue
        index_folder = place.with_name(place.name[: -len(PARTIAL_SUFFIX)])
        if index_folder.is_dir():
            return index_folder
    return None
