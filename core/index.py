"""The tile index: an HNSW graph over tile embeddings, kept in a folder on disk.

An index folder contains:

- ``manifest.json``: format version, encoder, sources (path, CRS, checksum, tile grid, band
  mapping, value stretch, tile and skip counts), metric, counts, build and HNSW parameters,
  a random ``index_id`` given at creation, timestamps, and the names and sizes of the data
  files of the current generation, with the SHA-256 of its tile table;
- ``graph.<generation>.hnsw``: the hnswlib graph, whose labels are tile ids;
- ``embeddings.<generation>.npy``: the L2-normalised embeddings as float16 ``(count, dim)``;
- ``tiles.<generation>.npy``: the tile table, a structured array ``(source_id, row, col)`` of
  int32 whose position is the tile id.

Tile ids are ``0 .. count - 1`` in the order tiles were added. Footprints are not stored: they
are recomputed from each source's tile grid (``core.grid.TileGrid``).

Writes are atomic. ``save()`` writes every data file under the names of a new generation (temp
file, fsync, rename), then replaces ``manifest.json``, which names the files of its generation,
and only then removes the files of older generations. A crash at any point leaves either the old
manifest with its complete old files or the new manifest with its complete new files.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import tokenize
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from . import get_logger
from .checkpoints import index_folder_of_checkpoint_name, is_checkpoint_folder, partial_folder_for
from .crs import spatial_reference
from .encoder import file_sha256
from .errors import LookalikeError, SearchError, SearchIndexError
from .grid import TileGrid
from .lock import index_lock
from .raster import value_stretch_problem

logger = get_logger("index")

FORMAT_NAME = "lookalike-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

SUPPORTED_METRICS = ("cosine",)

TILE_TABLE_DTYPE = np.dtype([("source_id", "<i4"), ("row", "<i4"), ("col", "<i4")])
EMBEDDING_DTYPE = np.dtype("<f2")

# HNSW parameters. The trade-offs are those described in hnswlib's ALGO_PARAMS.md:
# - M is the number of links per node. Recall on high-dimensional data rises with M, and so do
#   memory (about M * 8-10 bytes per element) and build time. The graph stores each vector as
#   float32, so a 1280-dim embedding takes 5 KiB and M=32 adds about 0.3 KiB to it.
# - ef_construction is the candidate-list size while inserting. It sets graph quality against
#   build time. A build spends most of its time in the encoder: inserting 2,609 NAIP tiles took
#   0.62 s of CPU against about 10 s for the int8 encoder (2 CPUs, hnswlib 0.8.0).
# - ef_search is the candidate-list size at query time: recall against latency. knn() raises it
#   to k when k is larger, because hnswlib requires ef >= k. Over 1M vectors grown from real
#   embeddings (bench/search_bench.py), ef 256 reached recall@10 0.980 to 0.9945 over six full
#   benchmark runs. hnswlib builds the graph on several threads, so each run differs. In the run
#   that gave 0.980, ef 512 reached 0.985, at 1.6 ms per query against 0.9 ms. The plugin runs
#   one query at a time, so that fraction of a millisecond buys a margin above the goal of 0.98.
#   Each index stores its value in its manifest.
# tests/unit/test_index.py checks recall@10 >= 0.98 against exact search with these values.
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 512
DEFAULT_RANDOM_SEED = 100
DEFAULT_INITIAL_CAPACITY_TILES = 1024
# Opens of an index that another process saves meanwhile: each save replaces the manifest once,
# so a second attempt reads a complete generation unless saves follow each other closely.
OPEN_ATTEMPTS = 3

# Below this many tiles, knn() uses brute force, which is exact and costs one small matrix
# product. The recall test uses more tiles so that it exercises HNSW.
EXACT_SEARCH_MAX_TILES = 2000
# When k is this fraction of the index or more, a graph search visits most nodes anyway, so
# knn() uses brute force. NOTE: the cut-over fraction is an estimate, not a measurement.
EXACT_SEARCH_MIN_FRACTION = 0.125

# Rows per block in exact_knn() and when copying embeddings: a float64 block of 1280-dim rows
# takes 80 MiB.
EXACT_SEARCH_BLOCK_ROWS = 8192

# Indexes up to this many tiles have every graph vector compared with its embedding at open. That
# took about 0.4 s for 20,000 tiles of 1280 dims on 2 CPUs, mostly reading the files. Larger
# indexes have blocks of rows spread over the index compared, as many rows in all.
FULL_VECTOR_CHECK_MAX_TILES = 200_000
# The largest difference allowed at open between a stored embedding and the graph's float32 copy
# of it: float16 rounding of a unit vector's component stays below 5e-4.
EMBEDDING_GRAPH_TOLERANCE = 2e-3

# Embeddings whose norm differs from 1 by more than this are renormalised on add.
NORM_TOLERANCE = 1e-3

DATA_FILE_KINDS = ("graph", "embeddings", "tiles")
DATA_FILE_PATTERN = re.compile(r"^(graph|embeddings|tiles)\.(\d{6})\.(hnsw|npy)(\.tmp)?$")
DATA_FILE_EXTENSIONS = {"graph": "hnsw", "embeddings": "npy", "tiles": "npy"}

# States of a folder an index is about to be written into, as index_folder_state() returns them.
FOLDER_EMPTY = "empty"
FOLDER_INDEX = "index"
FOLDER_DAMAGED_INDEX = "damaged index"
FOLDER_UNFINISHED = "unfinished save"
FOLDER_FOREIGN = "foreign"

ENCODER_KEYS = ("name", "checksum", "embedding_dim", "spec")


class IndexSavedElsewhereError(SearchIndexError):
    """The folder's index was saved by another copy (another build or program) since this one was opened."""
SOURCE_REQUIRED_KEYS = ("path", "grid")

PathLike = Union[str, "os.PathLike[str]"]


def make_tile_table(source_id: int, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
    """Build a tile table for tiles of one source, in the dtype ``TileIndex.add`` expects."""
    rows_array = np.asarray(rows, dtype=np.int64).ravel()
    cols_array = np.asarray(cols, dtype=np.int64).ravel()
    if rows_array.shape != cols_array.shape:
        raise SearchIndexError(
            f"rows ({rows_array.size}) and cols ({cols_array.size}) differ in length; "
            "pass one row and one column per tile"
        )
    table = np.empty(rows_array.size, dtype=TILE_TABLE_DTYPE)
    table["source_id"] = source_id
    table["row"] = rows_array
    table["col"] = cols_array
    return table


def exact_knn(embeddings: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Find the k rows of ``embeddings`` with the largest inner product with each query vector.

    With L2-normalised inputs the inner product is the cosine similarity. Returns
    ``(ids int64 (q, k'), similarities float32 (q, k'))`` with ``k' = min(k, len(embeddings))``,
    sorted by similarity, ties broken by the lower id so that duplicate vectors keep a stable
    order. ``embeddings`` may be float16 or a memory map: it is read in blocks of
    ``EXACT_SEARCH_BLOCK_ROWS`` rows.
    """
    # Products are taken in float64 and rounded to float32: BLAS sums different columns in
    # different orders, so in float32 two identical rows can score a few ulps apart and
    # duplicates would lose their id order. The float64 differences vanish in the rounding.
    queries = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    n_rows = int(embeddings.shape[0])
    n_results = min(int(k), n_rows)
    best_ids = np.empty((queries.shape[0], 0), dtype=np.int64)
    best_similarities = np.empty((queries.shape[0], 0), dtype=np.float32)
    if n_results <= 0:
        return best_ids, best_similarities

    for block_start in range(0, n_rows, EXACT_SEARCH_BLOCK_ROWS):
        block = np.asarray(embeddings[block_start : block_start + EXACT_SEARCH_BLOCK_ROWS], dtype=np.float64)
        block_similarities = (queries @ block.T).astype(np.float32)
        if not np.isfinite(block_similarities).all():
            raise SearchIndexError(
                f"embeddings {block_start} to {block_start + block.shape[0] - 1} include NaN or infinite values, "
                "which a build never stores; the index is damaged, build it again"
            )
        block_ids = np.broadcast_to(
            np.arange(block_start, block_start + block.shape[0], dtype=np.int64), block_similarities.shape
        )
        merged_ids = np.concatenate([best_ids, block_ids], axis=1)
        merged_similarities = np.concatenate([best_similarities, block_similarities], axis=1)
        best_ids, best_similarities = _top_k_stable(merged_ids, merged_similarities, n_results)

    return best_ids, np.clip(best_similarities, -1.0, 1.0)


def _top_k_stable(ids: np.ndarray, similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best columns per row, ordered by similarity and then by id."""
    k = min(k, ids.shape[1])
    out_ids = np.empty((ids.shape[0], k), dtype=np.int64)
    out_similarities = np.empty((ids.shape[0], k), dtype=np.float32)
    for query_index in range(ids.shape[0]):
        row_ids = ids[query_index]
        row_similarities = similarities[query_index]
        if row_ids.size > k:
            # Keep everything tied with the k-th value too, so the id tie-break below considers all
            # candidates for the last places.
            kth_value = np.partition(row_similarities, row_ids.size - k)[row_ids.size - k]
            keep = row_similarities >= kth_value
            row_ids = row_ids[keep]
            row_similarities = row_similarities[keep]
        order = np.lexsort((row_ids, -row_similarities))[:k]
        out_ids[query_index] = row_ids[order]
        out_similarities[query_index] = row_similarities[order]
    return out_ids, out_similarities


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_path(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _remove_quietly(path: Path) -> None:
    """Remove ``path`` if it exists, logging rather than raising, because a save error is on its way."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        logger.warning("could not remove %s after a failed save: %s", path, error)


def _fsync_directory(folder: Path) -> None:
    # Directories cannot be opened for fsync on Windows; the rename is still atomic there.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _data_file_name(kind: str, generation: int) -> str:
    return f"{kind}.{generation:06d}.{DATA_FILE_EXTENSIONS[kind]}"


def _validate_encoder_info(encoder_info: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key in ENCODER_KEYS if key not in encoder_info]
    if missing:
        raise SearchIndexError(
            f"encoder_info lacks {', '.join(missing)}; pass name, checksum (sha256), embedding_dim "
            "and spec (the ModelSpec as a dict) of the encoder that embeds the tiles"
        )
    embedding_dim = encoder_info["embedding_dim"]
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise SearchIndexError(
            f"encoder_info embedding_dim {embedding_dim!r} is invalid; pass the encoder's output "
            "dimension as a positive integer"
        )
    info = {key: encoder_info[key] for key in ENCODER_KEYS}
    try:
        json.dumps(info)
    except TypeError as error:
        raise SearchIndexError(
            f"encoder_info cannot be stored as JSON ({error}); pass the spec as a dict of plain values"
        ) from error
    return info


class TileIndex:
    """An HNSW index over tile embeddings, stored in a folder. Use ``create`` or ``open``.

    Not safe for concurrent writers: one process at a time may add and save.
    """

    def __init__(
        self, folder: Path, manifest: dict[str, Any], graph: Any, embeddings: np.ndarray, tile_table: np.ndarray
    ) -> None:
        self._folder = folder
        self._manifest = manifest
        self._graph = graph
        # Embeddings and tiles of the current generation on disk, plus blocks added since.
        self._stored_embeddings = embeddings
        self._stored_tile_table = tile_table
        self._pending_embeddings: list[np.ndarray] = []
        self._pending_tile_tables: list[np.ndarray] = []
        self._grids: dict[int, TileGrid] = {}
        # The manifest on disk that the next save replaces, as (generation, index_id); None when
        # the folder had no index. create() sets it when it replaces an index.
        self._replaces: Optional[tuple[Any, Any]] = (
            (manifest["generation"], manifest.get("index_id")) if manifest.get("files") else None
        )

    # -- creating and opening ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: PathLike,
        encoder_info: Mapping[str, Any],
        metric: str = "cosine",
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        initial_capacity_tiles: int = DEFAULT_INITIAL_CAPACITY_TILES,
        build_parameters: Optional[Mapping[str, Any]] = None,
        overwrite: bool = False,
        random_seed: int = DEFAULT_RANDOM_SEED,
        save_empty: bool = True,
    ) -> TileIndex:
        """Create an empty index in ``folder`` and, unless ``save_empty`` is False, save it.

        ``encoder_info`` has ``name``, ``checksum`` (sha256), ``embedding_dim`` and ``spec`` (a
        JSON-serialisable dict). ``folder`` may be missing or empty. A folder that contains an
        index is replaced only with ``overwrite=True``, atomically, and files in it that are not
        the index's stay. A non-empty folder that is not an index is never written to. With
        ``save_empty=False`` nothing is written until :meth:`save`, so an index being replaced
        stays whole until the new one is complete.
        """
        import hnswlib

        folder = Path(folder)
        info = _validate_encoder_info(encoder_info)
        if metric not in SUPPORTED_METRICS:
            raise SearchIndexError(f"metric {metric!r} is not supported; use one of {', '.join(SUPPORTED_METRICS)}")
        for name, value in (
            ("m", m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
            ("initial_capacity_tiles", initial_capacity_tiles),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SearchIndexError(f"{name} {value!r} is invalid; pass a positive integer")

        previous_generation = 0
        replaced: Optional[tuple[Any, Any]] = None
        if folder.exists() and not folder.is_dir():
            raise SearchIndexError(f"index folder {folder} is a file; choose a folder path")
        state = index_folder_state(folder)
        if state == FOLDER_FOREIGN:
            # Another program's files, or its manifest.json (a web app, a dataset), do not make
            # the folder ours, so even overwrite=True must not write there.
            if (folder / MANIFEST_NAME).is_file():
                raise SearchIndexError(
                    f"folder {folder} is not a Lookalike index: its {MANIFEST_NAME} belongs to another "
                    "program; choose an empty or new folder for the index"
                )
            raise SearchIndexError(
                f"folder {folder} is not empty and contains no index; choose an empty or new folder for the index"
            )
        if state in (FOLDER_INDEX, FOLDER_DAMAGED_INDEX):
            if not overwrite:
                raise SearchIndexError(
                    f"folder {folder} already contains an index; open it with TileIndex.open, or pass "
                    "overwrite=True to replace it"
                )
            previous_generation = _read_generation_for_overwrite(folder / MANIFEST_NAME)
            previous = read_manifest_json(folder / MANIFEST_NAME) or {}
            replaced = (previous.get("generation"), previous.get("index_id"))
        elif state == FOLDER_UNFINISHED:
            # Files of a first save that stopped before its manifest: nothing can open them, and
            # the save below replaces or removes them.
            logger.warning("replacing the files of an unfinished save in %s", folder)
        if save_empty:
            folder.mkdir(parents=True, exist_ok=True)

        # The graph stores L2-normalised vectors in hnswlib's "ip" space, whose distance is
        # 1 - dot product, so cosine similarity is 1 - distance. hnswlib's "cosine" space would
        # normalise its own copy only; normalising once here keeps the graph, the float16
        # embeddings and exact_knn() consistent with each other.
        graph = hnswlib.Index(space="ip", dim=info["embedding_dim"])
        graph.init_index(
            max_elements=initial_capacity_tiles, M=m, ef_construction=ef_construction, random_seed=random_seed
        )
        graph.set_ef(ef_search)

        now = _utc_now()
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "generation": previous_generation,
            "files": {},
            "encoder": info,
            "metric": metric,
            "tile_count": 0,
            "sources": [],
            "build_parameters": dict(build_parameters or {}),
            "hnsw": {
                "space": "ip",
                "m": m,
                "ef_construction": ef_construction,
                "ef_search": ef_search,
                "random_seed": random_seed,
            },
            # Tells this index from a later one built into the same folder, for callers that
            # keep tile ids across searches.
            "index_id": uuid.uuid4().hex,
            "created_at": now,
            "updated_at": now,
        }
        index = cls(
            folder,
            manifest,
            graph,
            np.empty((0, info["embedding_dim"]), dtype=EMBEDDING_DTYPE),
            np.empty(0, dtype=TILE_TABLE_DTYPE),
        )
        index._replaces = replaced
        if save_empty:
            index.save()
        logger.info("created index %s (encoder %s, dim %d)", folder, info["name"], info["embedding_dim"])
        return index

    @classmethod
    def open(cls, folder: PathLike) -> TileIndex:
        """Open an index folder; embeddings are memory-mapped, the graph is loaded into memory.

        Raises ``SearchIndexError`` when the folder or a file is missing, the format version is
        not this one, or the files disagree with the manifest or with each other.
        """
        folder = Path(folder)
        if folder.is_file():
            raise SearchIndexError(
                f"index folder {folder} is a file, not a folder; pass the folder that contains {MANIFEST_NAME}"
            )
        if not folder.is_dir():
            raise SearchIndexError(f"index folder {folder} not found; check the path or build an index there")
        for _ in range(OPEN_ATTEMPTS - 1):
            manifest_identity = _file_identity(folder / MANIFEST_NAME)
            try:
                return cls._load_translating_errors(folder)
            except SearchIndexError:
                # A save in another process replaces the manifest and then deletes the files of the
                # generation before it, which this open may have been reading.
                if _file_identity(folder / MANIFEST_NAME) == manifest_identity:
                    raise
                logger.info("The index in %s was saved while it was being opened; opening it again", folder)
        manifest_identity = _file_identity(folder / MANIFEST_NAME)
        try:
            return cls._load_translating_errors(folder)
        except SearchIndexError as error:
            if _file_identity(folder / MANIFEST_NAME) == manifest_identity:
                raise
            # Saved again during every attempt: the files are likely whole, only still changing.
            raise SearchIndexError(
                f"the index in {folder} was saved by another build or program {OPEN_ATTEMPTS} times while it was "
                "being opened; open it again when that build has finished"
            ) from error

    @classmethod
    def _load_translating_errors(cls, folder: Path) -> TileIndex:
        try:
            return cls._load(folder)
        except PermissionError as error:
            raise SearchIndexError(
                f"{error.filename or folder} cannot be read (permission denied); give your user read access to "
                f"the index folder {folder} and its files"
            ) from error
        except FileNotFoundError as error:
            raise SearchIndexError(
                f"index file {error.filename} is missing; the index is damaged, rebuild it"
            ) from error
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError, SyntaxError,
                tokenize.TokenError) as error:
            # Files edited or overwritten by hand fail in many ways inside json, NumPy and hnswlib.
            raise SearchIndexError(
                f"the index in {folder} is damaged and cannot be opened ({type(error).__name__}: {error}); build "
                "it again and choose to replace the existing index"
            ) from error

    @classmethod
    def _load(cls, folder: Path) -> TileIndex:
        import hnswlib

        manifest = _read_manifest(folder)
        count = manifest["tile_count"]
        embedding_dim = manifest["encoder"]["embedding_dim"]
        paths = _check_data_files(folder, manifest)

        embeddings = _load_array(paths["embeddings"], mmap_mode="r")
        if embeddings.dtype != EMBEDDING_DTYPE or embeddings.shape != (count, embedding_dim):
            raise SearchIndexError(
                f"embeddings file {paths['embeddings']} contains {embeddings.dtype} {embeddings.shape} but the "
                f"manifest expects float16 ({count}, {embedding_dim}); the index is damaged, rebuild it"
            )
        tile_table = _load_array(paths["tiles"])
        if tile_table.dtype != TILE_TABLE_DTYPE or tile_table.shape != (count,):
            raise SearchIndexError(
                f"tile table {paths['tiles']} contains {tile_table.dtype} {tile_table.shape} but the manifest "
                f"expects {count} rows of (source_id, row, col); the index is damaged, rebuild it"
            )
        _check_tiles_on_grids(paths["tiles"], tile_table, manifest["sources"])
        # Last, because the checks above name what is wrong where they can.
        _check_tile_table_digest(paths["tiles"], manifest["files"]["tiles"])

        _check_graph_links(paths["graph"], count, embeddings, paths["embeddings"])
        _follow_moved_sources(manifest, folder)
        graph = hnswlib.Index(space=manifest["hnsw"]["space"], dim=embedding_dim)
        try:
            graph.load_index(str(paths["graph"]), max_elements=max(count, 1))
        except RuntimeError as error:
            raise SearchIndexError(
                f"HNSW graph {paths['graph']} cannot be loaded ({error}); the index is damaged, rebuild it"
            ) from error
        if graph.element_count != count:
            raise SearchIndexError(
                f"HNSW graph {paths['graph']} contains {graph.element_count} tiles but the manifest expects "
                f"{count}; the index is damaged, rebuild it"
            )
        graph.set_ef(manifest["hnsw"]["ef_search"])
        return cls(folder, manifest, graph, embeddings, tile_table)

    # -- properties ---------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def count(self) -> int:
        """Number of tiles in the index, including those added since the last save."""
        return int(self._manifest["tile_count"])

    @property
    def embedding_dim(self) -> int:
        return int(self._manifest["encoder"]["embedding_dim"])

    @property
    def encoder_info(self) -> dict[str, Any]:
        """Encoder name, sha256 checksum, embedding dimension and spec, as given to ``create``."""
        return dict(self._manifest["encoder"])

    @property
    def metric(self) -> str:
        return str(self._manifest["metric"])

    @property
    def hnsw_parameters(self) -> dict[str, Any]:
        return dict(self._manifest["hnsw"])

    @property
    def build_parameters(self) -> dict[str, Any]:
        return dict(self._manifest["build_parameters"])

    def set_build_parameters(self, build_parameters: Mapping[str, Any]) -> None:
        """Replace the stored build parameters; written by the next ``save()``."""
        self._manifest["build_parameters"] = _json_copy(build_parameters, "build_parameters")

    @property
    def sources(self) -> list[dict[str, Any]]:
        """Copies of the source records; the position in the list is the source id."""
        return json.loads(json.dumps(self._manifest["sources"]))

    @property
    def embeddings(self) -> np.ndarray:
        """All embeddings as float16 ``(count, dim)``, memory-mapped from disk after ``open``.

        After ``add`` and before ``save`` the stored and added blocks are joined in memory.
        """
        if self._pending_embeddings:
            self._stored_embeddings = np.concatenate([self._stored_embeddings, *self._pending_embeddings])
            self._pending_embeddings = []
        return self._stored_embeddings

    @property
    def tile_table(self) -> np.ndarray:
        """The ``(source_id, row, col)`` int32 structured array; the position is the tile id."""
        if self._pending_tile_tables:
            self._stored_tile_table = np.concatenate([self._stored_tile_table, *self._pending_tile_tables])
            self._pending_tile_tables = []
        return self._stored_tile_table

    @property
    def identity(self) -> tuple[str, str]:
        """``(folder, id)``: equal for two copies of one index, different once the folder contains a new index.

        Adding tiles keeps it, because tile ids stay valid; indexes written before ``index_id``
        existed use their creation time instead.
        """
        manifest = self._manifest
        return str(self._folder.resolve()), str(manifest.get("index_id") or manifest.get("created_at", ""))

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as it will be written by the next ``save()``."""
        return json.loads(json.dumps(self._manifest))

    # -- encoder check ------------------------------------------------------------------------

    def check_encoder(self, name: str, checksum: str, purpose: str = "query") -> None:
        """Raise ``SearchIndexError`` unless the encoder is the one that built the index.

        The sha256 checksum decides; the names only make the message readable. ``purpose`` is
        "query" for a search and "add" for a build that adds rasters to the index.
        """
        built_with = self._manifest["encoder"]
        if checksum == built_with["checksum"]:
            return
        index_encoder = (f"index {self._folder} was built with encoder '{built_with['name']}' "
                         f"(sha256 {built_with['checksum'][:12]})")
        other_encoder = f"'{name}' (sha256 {str(checksum)[:12]})"
        if name == built_with["name"]:
            # Same name, other weights: the model file changed since the build (a plugin update,
            # or a model exported again), so no encoder at hand matches the index.
            raise SearchIndexError(
                f"{index_encoder}, and the encoder file of that name now has other weights (sha256 "
                f"{str(checksum)[:12]}), whose embeddings cannot be compared with the index's; build the index "
                "again with this encoder, or use the encoder file the index was built with"
            )
        if purpose == "add":
            raise SearchIndexError(
                f"{index_encoder}, but this build uses encoder {other_encoder}, and embeddings of two encoders "
                f"cannot be compared; add the rasters with '{built_with['name']}', or build a new index with "
                f"'{name}' in another folder"
            )
        raise SearchIndexError(
            f"{index_encoder}, but the query uses encoder {other_encoder}; query with '{built_with['name']}' or "
            f"rebuild the index with '{name}'"
        )

    # -- sources ------------------------------------------------------------------------------

    def add_source(self, source_record: Mapping[str, Any]) -> int:
        """Register a raster source and return its id.

        The record needs ``path`` and ``grid`` (``TileGrid.to_dict()``); ``crs_wkt``,
        ``checksum``, ``band_indexes``, ``value_stretch``, ``skipped_counts`` and any other
        JSON-serialisable keys are stored as given. ``id`` and ``tile_count`` are set here.
        """
        missing = [key for key in SOURCE_REQUIRED_KEYS if key not in source_record]
        if missing:
            raise SearchIndexError(
                f"source record lacks {', '.join(missing)}; pass at least the raster path and the "
                "tile grid as TileGrid.to_dict()"
            )
        record = _json_copy(source_record, "source record")
        source_id = len(self._manifest["sources"])
        # Parse the grid now so that a bad grid fails here, not at the first search.
        self._grids[source_id] = TileGrid.from_dict(record["grid"])
        record["id"] = source_id
        record["tile_count"] = 0
        self._manifest["sources"].append(record)
        return source_id

    def update_source(self, source_id: int, fields: Mapping[str, Any]) -> None:
        """Merge ``fields`` (e.g. ``skipped_counts``) into a source record; saved by ``save()``."""
        record = self._source_record(source_id)
        protected = {"id", "tile_count", "grid"} & set(fields)
        if protected:
            raise SearchIndexError(
                f"source fields {', '.join(sorted(protected))} cannot be updated; the index maintains "
                "id and tile_count, and a new grid needs a new source"
            )
        record.update(_json_copy(fields, "source fields"))

    def _source_record(self, source_id: int) -> dict[str, Any]:
        sources = self._manifest["sources"]
        if not 0 <= int(source_id) < len(sources):
            raise SearchIndexError(
                f"source id {source_id} not found; the index has {len(sources)} sources, add one with add_source first"
            )
        return sources[int(source_id)]

    def _grid(self, source_id: int) -> TileGrid:
        if source_id not in self._grids:
            self._grids[source_id] = TileGrid.from_dict(self._source_record(source_id)["grid"])
        return self._grids[source_id]

    # -- adding tiles -------------------------------------------------------------------------

    def add(self, embeddings: np.ndarray, tile_table: np.ndarray) -> np.ndarray:
        """Add tiles and return their new tile ids (int64).

        ``embeddings`` is float32 ``(n, dim)``; rows are L2-normalised here if they are not
        already. ``tile_table`` is a ``TILE_TABLE_DTYPE`` array (see ``make_tile_table``) or an
        integer ``(n, 3)`` array of ``(source_id, row, col)``. All-zero and non-finite
        embeddings are rejected: blank and nodata tiles must be skipped before encoding, because
        a zero vector has no direction to compare. The graph is resized when it is full.
        Changes are on disk only after ``save()``.

        NOTE: a tile already in the index is not detected; a resumed build must skip the
        ``(source_id, row, col)`` rows already in ``tile_table``.
        """
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise SearchIndexError(
                f"embeddings have shape {vectors.shape} but the index stores {self.embedding_dim}-dim "
                f"vectors of encoder '{self._manifest['encoder']['name']}'; embed the tiles with that encoder"
            )
        tiles = self._as_tile_table(tile_table)
        if tiles.shape[0] != vectors.shape[0]:
            raise SearchIndexError(
                f"{vectors.shape[0]} embeddings but {tiles.shape[0]} tile table rows; pass one row per embedding"
            )
        if vectors.shape[0] == 0:
            return np.empty(0, dtype=np.int64)
        vectors = _normalise_rows_for_index(vectors)
        self._check_tiles_in_grids(tiles)

        start = self.count
        needed = start + vectors.shape[0]
        capacity = self._graph.get_max_elements()
        if needed > capacity:
            # Doubling keeps the total cost of resizes linear in the number of tiles.
            new_capacity = max(needed, 2 * capacity)
            logger.debug("resizing HNSW graph from %d to %d tiles", capacity, new_capacity)
            self._graph.resize_index(new_capacity)
        tile_ids = np.arange(start, needed, dtype=np.int64)
        self._graph.add_items(vectors, tile_ids)

        self._pending_embeddings.append(vectors.astype(EMBEDDING_DTYPE))
        self._pending_tile_tables.append(tiles)
        self._manifest["tile_count"] = needed
        source_ids, tile_counts = np.unique(tiles["source_id"], return_counts=True)
        for source_id, tile_count in zip(source_ids.tolist(), tile_counts.tolist()):
            self._manifest["sources"][source_id]["tile_count"] += tile_count
        return tile_ids

    def _as_tile_table(self, tile_table: np.ndarray) -> np.ndarray:
        array = np.asarray(tile_table)
        if array.dtype.names is not None:
            if not set(TILE_TABLE_DTYPE.names) <= set(array.dtype.names):
                raise SearchIndexError(
                    f"tile table fields {array.dtype.names} lack source_id, row or col; build it with make_tile_table"
                )
            tiles = np.empty(array.shape[0], dtype=TILE_TABLE_DTYPE)
            for field in TILE_TABLE_DTYPE.names:
                tiles[field] = array[field]
            return tiles
        if array.ndim == 2 and array.shape[1] == 3 and np.issubdtype(array.dtype, np.integer):
            return _table_from_columns(array)
        raise SearchIndexError(
            f"tile table of dtype {array.dtype} and shape {array.shape} is invalid; pass make_tile_table(...) "
            "or an integer (n, 3) array of (source_id, row, col)"
        )

    def _check_tiles_in_grids(self, tiles: np.ndarray) -> None:
        for source_id in np.unique(tiles["source_id"]).tolist():
            grid = self._grid(source_id)
            of_source = tiles[tiles["source_id"] == source_id]
            outside = (
                (of_source["row"] < 0)
                | (of_source["row"] >= grid.n_rows)
                | (of_source["col"] < 0)
                | (of_source["col"] >= grid.n_cols)
            )
            if outside.any():
                first = of_source[np.argmax(outside)]
                raise SearchIndexError(
                    f"tile (row {first['row']}, col {first['col']}) is outside the {grid.n_rows} x "
                    f"{grid.n_cols} grid of source {source_id}; pass tile ids from that source's grid"
                )

    # -- saving -------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the index atomically as a new generation and remove older generations.

        Raises ``core.lock.IndexLockedError`` when another build or save holds the folder's lock,
        and ``SearchIndexError`` when a file cannot be written.
        """
        with index_lock(self._folder):
            try:
                self._save_unlocked()
            except OSError as error:
                earlier = ("; the index saved there before is unchanged" if self._replaces is not None
                           else "; nothing of it was left there")
                raise SearchIndexError(
                    f"saving the index in {self._folder} failed: {error}. Free disk space or fix the folder's "
                    f"permissions, then try again{earlier}."
                ) from error

    def _save_unlocked(self) -> None:
        self._check_not_saved_elsewhere()
        self._folder.mkdir(parents=True, exist_ok=True)
        generation = int(self._manifest["generation"]) + 1
        embeddings = self.embeddings
        tile_table = self.tile_table
        paths = {kind: self._folder / _data_file_name(kind, generation) for kind in DATA_FILE_KINDS}

        manifest = dict(self._manifest)
        manifest["generation"] = generation
        try:
            self._write_atomically(paths["graph"], self._write_graph)
            self._write_atomically(paths["embeddings"], lambda temp: _write_embeddings(temp, embeddings))
            self._write_atomically(paths["tiles"], lambda temp: _write_npy(temp, tile_table))
            manifest["files"] = {
                kind: {"name": paths[kind].name, "size_bytes": paths[kind].stat().st_size} for kind in DATA_FILE_KINDS
            }
            # The tile table maps tile ids to places. Rows swapped in place keep its size and every
            # other check, so its digest is kept too (12 bytes per tile, quick to hash at open).
            manifest["files"]["tiles"]["sha256"] = file_sha256(paths["tiles"])
            manifest["updated_at"] = _utc_now()
            manifest_text = json.dumps(manifest, indent=2, sort_keys=True)
            # The manifest is replaced last: until then it names the previous generation's files,
            # which are all still present, so an interrupted save leaves the previous index intact.
            self._write_atomically(
                self._folder / MANIFEST_NAME,
                lambda temp: temp.write_text(manifest_text, encoding="utf-8"),
                sync_folder=False,
            )
        except BaseException:
            # No manifest names this generation's files, so they only take up space, and a save
            # that failed on a full disk needs that space back. Temporary files of an earlier save
            # that was killed are removed too, because under the lock no other save writes them.
            for path in paths.values():
                _remove_quietly(path)
            for path in self._folder.iterdir():
                match = DATA_FILE_PATTERN.match(path.name)
                if match is not None and match.group(4):
                    _remove_quietly(path)
            raise
        _fsync_directory(self._folder)
        self._manifest = manifest
        self._replaces = (manifest["generation"], manifest.get("index_id"))

        # Drop the reference to the old memory map before removing its file (Windows cannot
        # delete a mapped file).
        self._stored_embeddings = np.load(paths["embeddings"], mmap_mode="r", allow_pickle=False)
        self._stored_tile_table = tile_table
        self._remove_stale_files(keep={path.name for path in paths.values()})
        logger.info("saved index %s: %d tiles, generation %d", self._folder, self.count, generation)

    def _check_not_saved_elsewhere(self) -> None:
        """Refuse to save when the folder's index changed since this copy was opened or created.

        Another copy's save, or a new index built into the folder, would be replaced: its tiles
        would be lost, and this save's file names could be those of its live files.
        """
        content = read_manifest_json(self._folder / MANIFEST_NAME)
        if content is None or content.get("format") != FORMAT_NAME:
            return
        on_disk = (content.get("generation"), content.get("index_id"))
        if on_disk == self._replaces:
            return
        raise IndexSavedElsewhereError(
            f"the index in {self._folder} was saved from another copy since this one was opened "
            f"(generation {on_disk[0]} on disk, {self._manifest['generation']} here); open it again with "
            "TileIndex.open and repeat the change, so that the tiles saved there are kept"
        )

    def _write_graph(self, path: Path) -> None:
        self._graph.save_index(str(path))
        # hnswlib does not report failed writes (a full disk gave a short file and no error), so
        # the file is checked before it replaces anything.
        _check_graph_file_length(path, self.count)

    def _write_atomically(self, path: Path, write: Any, sync_folder: bool = True) -> None:
        temp_path = path.with_name(path.name + ".tmp")
        try:
            write(temp_path)
            _fsync_path(temp_path)
            os.replace(temp_path, path)
        except BaseException:
            _remove_quietly(temp_path)
            raise
        if sync_folder:
            _fsync_directory(self._folder)

    def _remove_stale_files(self, keep: set[str]) -> None:
        for path in self._folder.iterdir():
            is_data_file = DATA_FILE_PATTERN.match(path.name) is not None
            is_manifest_temp = path.name == MANIFEST_NAME + ".tmp"
            if (is_data_file or is_manifest_temp) and path.name not in keep:
                try:
                    path.unlink()
                except OSError as error:
                    # Still mapped by a caller (Windows) or read-only: the next save retries.
                    logger.warning("could not remove old index file %s: %s", path, error)

    # -- queries ------------------------------------------------------------------------------

    def knn(self, vectors: np.ndarray, k: int, ef: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Find the k nearest tiles of each query vector.

        Returns ``(tile_ids int64 (q, k'), similarities float32 (q, k'))`` with
        ``k' = min(k, count)``, so an empty index gives ``(q, 0)`` arrays. Similarity is the
        cosine similarity in [-1, 1], best first. ``ef`` overrides the stored ``ef_search`` and is
        raised to k' when smaller. Small indexes and large k use exact search.
        """
        queries = _as_query_matrix(vectors, self.embedding_dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k {k!r} is invalid; pass the number of neighbours as a positive integer")
        if ef is not None and (isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef < 1):
            raise SearchError(f"ef {ef!r} is invalid; pass a positive integer, or None for the index's ef_search")
        n_results = min(int(k), self.count)
        if n_results == 0:
            return np.empty((queries.shape[0], 0), dtype=np.int64), np.empty((queries.shape[0], 0), dtype=np.float32)

        if self.count <= EXACT_SEARCH_MAX_TILES or n_results >= EXACT_SEARCH_MIN_FRACTION * self.count:
            return self._exact_knn(queries, n_results)

        ef_search = max(int(ef) if ef is not None else int(self._manifest["hnsw"]["ef_search"]), n_results)
        self._graph.set_ef(ef_search)
        try:
            labels, distances = self._graph.knn_query(queries, k=n_results)
        except RuntimeError as error:
            # hnswlib raises when the graph search reaches fewer than k tiles.
            logger.warning("HNSW search for k=%d failed (%s); using exact search", n_results, error)
            return self._exact_knn(queries, n_results)
        # NOTE: the graph keeps its own copy of the vectors, so damage to the embeddings file is
        # found here only in the rows of the tiles found; other damaged rows go unnoticed.
        found_rows = np.asarray(self.embeddings[np.unique(labels)], dtype=np.float32)
        if not (np.isfinite(distances).all() and np.isfinite(found_rows).all()):
            raise SearchIndexError(
                f"The index in {self._folder} is damaged: it contains NaN or infinite values, which a build never "
                "stores; build it again."
            )
        similarities = np.clip(1.0 - distances, -1.0, 1.0).astype(np.float32)
        return labels.astype(np.int64), similarities

    def _exact_knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return exact_knn(self.embeddings, queries, k)
        except SearchIndexError as error:
            raise SearchIndexError(f"The index in {self._folder}: {error}.") from error

    def tile_bounds(self, tile_id: int) -> tuple[float, float, float, float]:
        """Return the footprint ``(xmin, ymin, xmax, ymax)`` of a tile in its grid's CRS."""
        tile = self._tile(tile_id)
        return tuple(self._grid(int(tile["source_id"])).tile_bounds(int(tile["row"]), int(tile["col"])))

    def tile_crs_wkt(self, tile_id: int) -> str:
        """Return the WKT of the CRS that ``tile_bounds(tile_id)`` is in (the source's grid CRS)."""
        tile = self._tile(tile_id)
        return self._grid(int(tile["source_id"])).crs_wkt

    def _tile(self, tile_id: int) -> np.void:
        if not 0 <= int(tile_id) < self.count:
            raise SearchIndexError(f"tile id {tile_id} not found; the index has {self.count} tiles")
        return self.tile_table[int(tile_id)]


def _table_from_columns(array: np.ndarray) -> np.ndarray:
    tiles = np.empty(array.shape[0], dtype=TILE_TABLE_DTYPE)
    tiles["source_id"] = array[:, 0]
    tiles["row"] = array[:, 1]
    tiles["col"] = array[:, 2]
    return tiles


def _normalise_rows_for_index(vectors: np.ndarray) -> np.ndarray:
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        first = int(np.argmin(finite))
        raise SearchIndexError(
            f"{int((~finite).sum())} embeddings contain NaN or infinity (first at row {first}); check the "
            "encoder input for nodata values"
        )
    norms = np.linalg.norm(vectors, axis=1)
    zero = norms == 0
    if zero.any():
        first = int(np.argmax(zero))
        raise SearchIndexError(
            f"{int(zero.sum())} embeddings are all zeros (first at row {first}); skip blank or nodata tiles "
            "before encoding them"
        )
    if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        vectors = vectors / norms[:, None]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _as_query_matrix(vectors: np.ndarray, embedding_dim: int) -> np.ndarray:
    """Check query vectors and return them L2-normalised as float32 ``(q, dim)``."""
    queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if queries.ndim != 2 or queries.shape[1] != embedding_dim:
        raise SearchError(
            f"query vectors have shape {np.shape(vectors)} but the index contains {embedding_dim}-dim embeddings; "
            "embed the query with the index's encoder"
        )
    if not np.isfinite(queries).all():
        raise SearchError("a query embedding contains NaN or infinity; check the query area for nodata values")
    norms = np.linalg.norm(queries, axis=1)
    if (norms == 0).any():
        raise SearchError(
            "a query embedding is all zeros, so the query area is blank or nodata; draw the query over "
            "imagery with content"
        )
    return np.ascontiguousarray(queries / norms[:, None], dtype=np.float32)


def _write_embeddings(path: Path, embeddings: np.ndarray) -> None:
    # Written block by block so that copying a memory-mapped generation does not load it. Plain
    # writes replace a writable memory map, because on a full disk they raise OSError, while the
    # pages of a map that cannot be stored kill the process with SIGBUS.
    header = {"descr": np.lib.format.dtype_to_descr(EMBEDDING_DTYPE), "fortran_order": False,
              "shape": tuple(embeddings.shape)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for block_start in range(0, embeddings.shape[0], EXACT_SEARCH_BLOCK_ROWS):
            block = embeddings[block_start : block_start + EXACT_SEARCH_BLOCK_ROWS]
            handle.write(np.ascontiguousarray(block, dtype=EMBEDDING_DTYPE).tobytes())


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _json_copy(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as error:
        raise SearchIndexError(
            f"{what} cannot be stored as JSON ({error}); pass plain values (str, number, list, dict)"
        ) from error


def read_manifest_json(manifest_path: Path) -> Optional[dict[str, Any]]:
    """Return ``manifest_path`` parsed as a JSON object, or None when it is missing, not JSON or not an object.

    Raises:
        SearchIndexError: the file exists but this user may not read it.
    """
    try:
        content = json.loads(manifest_path.read_text(encoding="utf-8"))
    except PermissionError as error:
        # Without this error the folder would be reported as another program's, which misleads.
        raise SearchIndexError(
            f"{manifest_path} cannot be read ({error.strerror}); give your user read access to the index "
            "folder or choose another folder."
        ) from error
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def first_grid_in(folder: Path) -> Optional[TileGrid]:
    """Return the tile grid of the first raster of the index in ``folder``, or None without a readable one there."""
    try:
        manifest = read_manifest_json(Path(folder) / MANIFEST_NAME)
        return TileGrid.from_dict(manifest["sources"][0]["grid"])
    except (TypeError, KeyError, IndexError, ValueError, LookalikeError, OSError):
        return None


def enclosing_index_folder(path: PathLike) -> Optional[Path]:
    """Return the nearest folder above ``path`` (symbolic links resolved) that Lookalike owns, or None.

    An index, a damaged one and a first save that stopped all count, because writing into any of
    them could replace or hide one of its files. So does the checkpoint folder of an interrupted
    build, which is deleted whole when that build is saved. :func:`lookalike_folder_kind` names
    the kind for messages.
    """
    index_states = (FOLDER_INDEX, FOLDER_DAMAGED_INDEX, FOLDER_UNFINISHED)
    for folder in Path(os.path.realpath(os.fspath(path))).parents:
        if index_folder_state(folder) in index_states or is_checkpoint_folder(folder):
            return folder
    return None


def lookalike_folder_kind(folder: Path) -> str:
    """Return the words that name an :func:`enclosing_index_folder` result in a message."""
    if is_checkpoint_folder(folder):
        return "the checkpoint folder of an interrupted Lookalike build"
    return "the Lookalike index folder"


def check_output_outside_lookalike_folders(path: PathLike, is_folder: bool = False) -> None:
    """Raise SearchIndexError when an output at ``path`` would go into a folder Lookalike owns.

    That is an index folder (the output itself, for a folder), any folder inside one, or the
    checkpoint folder of a build, whose next run deletes it with everything in it.
    """
    resolved = Path(os.path.realpath(os.fspath(path)))
    kind = "folder" if is_folder else "file"
    if is_folder and index_folder_state(resolved) in (FOLDER_INDEX, FOLDER_DAMAGED_INDEX, FOLDER_UNFINISHED):
        raise SearchIndexError(f"{path} is a Lookalike index folder, where the output could replace its files; "
                               "choose another folder")
    if is_folder and is_checkpoint_folder(resolved):
        raise SearchIndexError(f"{path} is the checkpoint folder of an interrupted Lookalike build, which the next "
                               "run of that build deletes with everything in it; choose another folder")
    folder = enclosing_index_folder(resolved)
    if folder is not None:
        raise SearchIndexError(f"{path} is inside {lookalike_folder_kind(folder)} {folder}, where the output could "
                               f"replace or lose a file of Lookalike's; choose a {kind} outside that folder")
    index_folder = index_folder_of_checkpoint_name(resolved)
    if index_folder is not None:
        raise SearchIndexError(f"{path} is in the checkpoint folder of builds into {index_folder}, and an output "
                               f"there would stop every later build of that index; choose a {kind} elsewhere")


def index_folder_state(folder: Path) -> str:
    """Classify ``folder`` before an index is written into it; return one of the ``FOLDER_*`` values.

    ``FOLDER_EMPTY``: missing or empty. ``FOLDER_INDEX``: it has a Lookalike manifest.
    ``FOLDER_DAMAGED_INDEX``: its manifest cannot be parsed and everything else in it is an index
    file. ``FOLDER_UNFINISHED``: index files only, no manifest, as a first save that stopped
    leaves them. ``FOLDER_FOREIGN``: anything else, which is never written to.
    """
    if not folder.is_dir():
        return FOLDER_EMPTY
    names = [entry.name for entry in folder.iterdir()]
    if not names:
        return FOLDER_EMPTY
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file() and is_index_manifest(manifest_path):
        return FOLDER_INDEX
    others = [name for name in names if name != MANIFEST_NAME]
    only_index_files = all(
        (DATA_FILE_PATTERN.match(name) is not None or name == MANIFEST_NAME + ".tmp") and (folder / name).is_file()
        for name in others
    )
    if not only_index_files:
        return FOLDER_FOREIGN
    if MANIFEST_NAME not in names:
        return FOLDER_UNFINISHED
    # A manifest that parses as JSON but is not ours belongs to another program.
    if manifest_path.is_file() and others and not _parses_as_json(manifest_path):
        return FOLDER_DAMAGED_INDEX
    return FOLDER_FOREIGN


def _parses_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    except OSError:
        # Unreadable is not proof of damage; the folder is then left alone.
        return True
    return True


def is_index_manifest(manifest_path: Path) -> bool:
    """Tell whether ``manifest_path`` is a Lookalike manifest: a JSON object whose format is ours."""
    content = read_manifest_json(manifest_path)
    return content is not None and content.get("format") == FORMAT_NAME


def index_damage(folder: PathLike) -> Optional[str]:
    """Return why the index in ``folder`` cannot be opened, from its manifest and file sizes, or None.

    This reads no data file, so it is cheap even for a large index; ``TileIndex.open`` checks more.
    """
    folder = Path(folder)
    try:
        _check_data_files(folder, _read_manifest(folder))
    except SearchIndexError as error:
        return str(error)
    return None


def _read_generation_for_overwrite(manifest_path: Path) -> int:
    """Return the generation of an index about to be replaced, or 0 if its manifest is unreadable."""
    content = read_manifest_json(manifest_path)
    if content is None:
        logger.warning("replacing index with unreadable manifest %s", manifest_path)
        return 0
    generation = content.get("generation", 0)
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else 0


def _check_tile_table_digest(path: Path, entry: Mapping[str, Any]) -> None:
    """Raise SearchIndexError when the tile table differs from the SHA-256 its manifest entry records.

    Indexes saved before the digest was recorded have none, and are not checked.
    """
    recorded = entry.get("sha256")
    if recorded is None:
        return
    if not isinstance(recorded, str) or file_sha256(path) != recorded:
        raise SearchIndexError(
            f"tile table {path} does not match the SHA-256 in the manifest: its rows were edited or the file was "
            "replaced, so tile ids would point at other places; the index is damaged, rebuild it"
        )


def _load_array(path: Path, mmap_mode: Optional[str] = None) -> np.ndarray:
    """Load an index's .npy file; a damaged header raises SearchIndexError naming the file."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, SyntaxError, tokenize.TokenError, EOFError) as error:
        raise SearchIndexError(
            f"{path} is not a readable NumPy array file ({type(error).__name__}: {error}); the index is damaged, "
            "rebuild it"
        ) from error


def _file_identity(path: Path) -> Optional[tuple[int, int, int]]:
    """Return ``(inode, size, mtime_ns)`` of ``path``, or None when it cannot be read. A replaced file differs."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def path_from_index(raster_path: str, index_folder: PathLike) -> Optional[str]:
    """Return ``raster_path`` relative to ``index_folder`` for a source record, or None where there is none.

    A folder that contains both the index and its rasters can then move as a whole (a project
    folder copied to another computer), and the index still finds its rasters.
    """
    if not os.path.isfile(raster_path):
        return None
    try:
        # Without resolving symbolic links: a link inside a project folder moves with the folder.
        return os.path.relpath(os.path.abspath(raster_path), os.path.abspath(os.fspath(index_folder)))
    except ValueError:
        # On Windows, a raster on another drive than the index has no relative path.
        return None


def _follow_moved_sources(manifest: dict[str, Any], folder: Path) -> None:
    """Point each source whose raster is missing at its path relative to ``folder``, when the same file is there.

    A file counts as the same when its size and SHA-256 equal the recorded ones. A VRT, whose own
    bytes QGIS rewrites, records neither, so it is followed without that check. The recorded path
    is kept as ``recorded_path``; nothing is written here, and a later save of the index writes
    both paths.
    """
    build_folder = (manifest.get("build_parameters") or {}).get("index_folder")
    for record in manifest["sources"]:
        path = record.get("path")
        if not isinstance(path, str) or os.path.exists(path):
            continue
        relative = record.get("path_from_index")
        if not isinstance(relative, str) and isinstance(build_folder, str) and os.path.isabs(build_folder):
            # Indexes built before path_from_index was recorded: their build's folder gives it.
            relative = os.path.relpath(path, build_folder)
        if not isinstance(relative, str):
            continue
        candidate = os.path.normpath(os.path.join(os.path.abspath(folder), relative))
        if not os.path.isfile(candidate):
            continue
        size = record.get("file_size_bytes")
        if isinstance(size, int) and (os.path.getsize(candidate) != size
                                      or file_sha256(Path(candidate)) != record.get("checksum")):
            continue
        logger.info("Raster %s of index %s is missing; reading %s, found at the same place relative to the index",
                    path, folder, candidate)
        record["recorded_path"] = path
        record["path"] = candidate


def _read_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        if index_folder_state(folder) == FOLDER_UNFINISHED:
            if partial_folder_for(folder).is_dir():
                raise SearchIndexError(
                    f"{folder} contains the files of an index whose first save stopped before it finished; run the "
                    "build again with the same settings to finish it (it continues from its checkpoints), or "
                    "choose the folder of a finished index"
                )
            raise SearchIndexError(
                f"{folder} contains index data files but no {MANIFEST_NAME}: its first save stopped before it "
                "finished, or the manifest was deleted, and no checkpoints are left to finish it from. Restore "
                f"{MANIFEST_NAME} from a backup, or build the index again"
            )
        raise SearchIndexError(
            f"{manifest_path} not found, so {folder} is not a Lookalike index; choose the index folder "
            "or build an index there"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except PermissionError:
        # Not damage: the caller names the file and the fix.
        raise
    except (OSError, ValueError) as error:
        raise SearchIndexError(
            f"{manifest_path} cannot be read as JSON ({error}); the index is damaged; build it again "
            "and choose to replace the existing index"
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SearchIndexError(f"{manifest_path} is not a Lookalike index manifest; choose the index folder")

    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        fix = "update the Lookalike plugin" if newer else "rebuild the index with this version of Lookalike"
        raise SearchIndexError(
            f"index {folder} has format version {version!r} but this plugin reads version {FORMAT_VERSION}; {fix}"
        )

    required = ("generation", "files", "encoder", "metric", "tile_count", "sources", "hnsw", "build_parameters")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise SearchIndexError(f"{manifest_path} lacks {', '.join(missing)}; the index is damaged, rebuild it")
    count = manifest["tile_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise SearchIndexError(f"{manifest_path} has tile_count {count!r}; the index is damaged, rebuild it")
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise SearchIndexError(f"{manifest_path} has {problem}; the index is damaged, rebuild it")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: dict[str, Any]) -> Optional[str]:
    """Say which entry of a manifest has the wrong type or value, or return None.

    Checked at open so that a manifest edited by hand fails there, naming the entry, and not
    later inside a search or a build.
    """
    for key, kind in (("files", dict), ("encoder", dict), ("hnsw", dict), ("sources", list),
                      ("build_parameters", dict), ("metric", str)):
        if not isinstance(manifest[key], kind):
            return f"{key} of type {type(manifest[key]).__name__}, not {kind.__name__}"
    if manifest["metric"] not in SUPPORTED_METRICS:
        return f"metric {manifest['metric']!r}, not one of {', '.join(SUPPORTED_METRICS)}"
    encoder = manifest["encoder"]
    if not all(isinstance(encoder.get(key), str) for key in ("name", "checksum")):
        return "an encoder without a name or checksum"
    if not _is_count(encoder.get("embedding_dim")) or not encoder["embedding_dim"]:
        return f"encoder embedding_dim {encoder.get('embedding_dim')!r}"
    hnsw = manifest["hnsw"]
    if hnsw.get("space") != "ip":
        return f"HNSW space {hnsw.get('space')!r}, not 'ip'"
    for key in ("m", "ef_construction", "ef_search"):
        if not _is_count(hnsw.get(key)) or not hnsw[key]:
            return f"HNSW {key} {hnsw.get(key)!r}"
    source_tiles = 0
    for source_id, record in enumerate(manifest["sources"]):
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            return f"source {source_id} without a path"
        if not isinstance(record.get("grid"), dict):
            return f"source {source_id} without a grid"
        if record.get("id") != source_id:
            return f"source {source_id} with id {record.get('id')!r}"
        band_indexes = record.get("band_indexes")
        if band_indexes is not None and not (
            isinstance(band_indexes, list) and band_indexes and all(_is_count(band) and band for band in band_indexes)
        ):
            return f"source {source_id} with band_indexes {band_indexes!r}, not a list of band numbers"
        stretch = record.get("value_stretch")
        if stretch is not None:
            problem = value_stretch_problem(stretch)
            if problem is not None:
                return f"source {source_id} with {problem}"
            if band_indexes is not None and stretch["band_indexes"] != band_indexes:
                return (f"source {source_id} with band_indexes {band_indexes} but a value_stretch for bands "
                        f"{stretch['band_indexes']}")
        skipped_counts = record.get("skipped_counts", {})
        if (not isinstance(skipped_counts, dict) or not _is_count(record.get("tile_count", 0))
                or not all(_is_count(count) and count < 2**62 for count in skipped_counts.values())):
            return f"source {source_id} with invalid tile or skip counts"
        try:
            TileGrid.from_dict(record["grid"])
            spatial_reference(str(record["grid"].get("crs_wkt")))
        except (LookalikeError, KeyError, TypeError, ValueError) as error:
            return f"source {source_id} with an invalid grid ({error})"
        source_tiles += record.get("tile_count", 0)
    if source_tiles != manifest["tile_count"]:
        return f"sources with {source_tiles} tiles in all but tile_count {manifest['tile_count']}"
    return None


def _check_tiles_on_grids(path: Path, tile_table: np.ndarray, sources: Sequence[Mapping[str, Any]]) -> None:
    """Raise SearchIndexError when a tile names no source, or a row or column outside its source's grid."""
    if not len(tile_table):
        return
    # The manifest was validated before, so source ids are positions and every grid has its size.
    n_rows = np.array([source["grid"]["n_rows"] for source in sources] or [0], dtype=np.int64)
    n_cols = np.array([source["grid"]["n_cols"] for source in sources] or [0], dtype=np.int64)
    source_ids = tile_table["source_id"].astype(np.int64)
    known = (source_ids >= 0) & (source_ids < len(sources))
    ids = np.where(known, source_ids, 0)
    fits = known & (tile_table["row"] >= 0) & (tile_table["row"] < n_rows[ids])
    fits &= (tile_table["col"] >= 0) & (tile_table["col"] < n_cols[ids])
    if fits.all():
        _check_tiles_unique(path, tile_table, n_rows, n_cols)
        return
    tile_id = int(np.argmin(fits))
    source_id, row, col = (int(value) for value in tile_table[tile_id])
    where = (
        f"row {row}, col {col} of source {source_id}, whose grid has {n_rows[source_id]} rows x "
        f"{n_cols[source_id]} columns" if known[tile_id] else f"source {source_id}, which the manifest lacks"
    )
    raise SearchIndexError(
        f"tile table {path} gives tile {tile_id} {where}; the index is damaged, rebuild it"
    )


def _check_tiles_unique(path: Path, tile_table: np.ndarray, n_rows: np.ndarray, n_cols: np.ndarray) -> None:
    """Raise SearchIndexError when the tile table lists one tile twice. Every tile must already lie on its grid."""
    # One number per tile: the tile's cell counted across the grids of all sources in order.
    first_cell = np.concatenate([[0], np.cumsum(n_rows * n_cols)[:-1]])
    source_ids = tile_table["source_id"].astype(np.int64)
    cells = first_cell[source_ids] + tile_table["row"].astype(np.int64) * n_cols[source_ids] + tile_table["col"]
    order = np.argsort(cells, kind="stable")
    repeated = np.flatnonzero(cells[order][1:] == cells[order][:-1])
    if not repeated.size:
        return
    first, second = sorted(int(order[position]) for position in (repeated[0], repeated[0] + 1))
    source_id, row, col = (int(value) for value in tile_table[first])
    raise SearchIndexError(
        f"tile table {path} lists row {row}, col {col} of source {source_id} twice (tiles {first} and {second}); "
        "the index is damaged, rebuild it"
    )


# The header hnswlib 0.8 writes before the graph: six size_t, the top level (int), the entry point
# (uint32), three size_t, the level multiplier (double) and ef_construction (size_t).
_GRAPH_HEADER = struct.Struct("<6Q i I 3Q d Q")
_LINK_LIST_SIZE = struct.Struct("<I")


def _check_graph_file_length(path: Path, expected_count: int) -> None:
    """Raise OSError unless ``path`` is exactly as long as the hnswlib graph its header describes.

    After the header come ``count`` level-0 records of ``size_data_per_element`` bytes, then for
    each element a uint32 byte count and that many bytes of upper-level links.
    """
    size_bytes = path.stat().st_size
    if size_bytes < _GRAPH_HEADER.size:
        raise OSError(f"the graph file {path} is {size_bytes} bytes long, shorter than its header")
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = _GRAPH_HEADER.unpack_from(data, 0)
        count, size_data_per_element = header[2], header[3]
        position = _GRAPH_HEADER.size + count * size_data_per_element
        for _ in range(count if count == expected_count else 0):
            if position + _LINK_LIST_SIZE.size > size_bytes:
                break
            position += _LINK_LIST_SIZE.size + _LINK_LIST_SIZE.unpack_from(data, position)[0]
    if count != expected_count or position != size_bytes:
        raise OSError(
            f"the graph file {path} was not written completely ({size_bytes} bytes for {count} of "
            f"{expected_count} tiles); the disk may be full"
        )


def _check_graph_links(path: Path, count: int, embeddings: np.ndarray, embeddings_path: Path) -> None:
    """Raise SearchIndexError when the graph file does not contain a sound graph of these ``count`` embeddings.

    hnswlib follows the links it loads without checking them, so a link or entry point damaged
    in place (the file keeps its length) made a search read outside the graph and crash the
    process. Exact search reads the embeddings file and graph search the graph's own float32
    copies, so the copies are compared with the stored embeddings (see :func:`_graph_vector_problem`).
    An edit of either file, in place, would otherwise change search results silently.
    """
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        # The arrays viewing the map are gone when the helper returns, so the map can close.
        try:
            problem = _graph_link_problem(data, count)
            if problem is None:
                problem = _graph_vector_problem(data, embeddings, embeddings_path)
        except (ValueError, struct.error) as error:
            problem = f"cannot be read ({error})"
    if problem is not None:
        raise SearchIndexError(f"HNSW graph {path} {problem}; the index is damaged, rebuild it")


def _graph_records(data: mmap.mmap, count: int, record_bytes: int) -> np.ndarray:
    """Return the level-0 records of the graph in ``data`` as uint32 rows, a view of the map."""
    return np.frombuffer(data, dtype="<u4", count=count * record_bytes // 4,
                         offset=_GRAPH_HEADER.size).reshape(count, record_bytes // 4)


def _graph_link_problem(data: mmap.mmap, count: int) -> Optional[str]:
    """Return what is wrong with the links, levels, labels or entry point of the graph in ``data``, or None.

    The layout is the one :func:`_check_graph_file_length` describes. Each level-0 record starts
    with its link count (the low 16 bits of a uint32) and ``maxM0`` tile numbers, and contains the
    tile's label (uint64) at ``label_offset``. Each tile's upper levels follow the records, each
    a count and ``maxM`` numbers. A link on level ``l`` must name a tile that has level ``l``,
    and the entry point must be a tile on the top level.
    """
    (offset_level0, _max_elements, element_count, record_bytes, label_offset, offset_data, max_level,
     entry_point, max_m, max_m0, _m, _mult, _ef_construction) = _GRAPH_HEADER.unpack_from(data, 0)
    # hnswlib 0.8.0 writes these fields from the others and loads them unchecked: a damaged level-0
    # offset crashed the process inside load_index.
    if offset_level0 != 0 or offset_data != 4 * (1 + max_m0) or record_bytes != label_offset + 8:
        return (f"has a header whose offsets (level 0 at {offset_level0}, vectors at {offset_data}, labels at "
                f"{label_offset} of {record_bytes}-byte records) do not fit its {max_m0} level-0 links")
    if element_count != count or not count:
        # A count that differs from the manifest's is reported by the caller.
        return None
    if record_bytes % 4 or label_offset % 4 or label_offset + 8 > record_bytes or 4 * (1 + max_m0) > record_bytes:
        return f"has records of {record_bytes} bytes that cannot hold its {max_m0} links and label"
    if entry_point >= count or max_level < 0:
        return f"starts its search at tile {entry_point} on level {max_level}, outside its {count} tiles"
    records = _graph_records(data, count, record_bytes)
    link_counts = records[:, 0] & 0xFFFF
    used = np.arange(max_m0) < np.minimum(link_counts, max_m0)[:, None]
    if (link_counts > max_m0).any() or (records[:, 1 : 1 + max_m0][used] >= count).any():
        return f"links level-0 tiles to tile numbers beyond its {count} tiles"
    labels = records[:, label_offset // 4] | (records[:, label_offset // 4 + 1].astype(np.uint64) << np.uint64(32))
    if labels.max() >= count or np.unique(labels).size != count:
        return f"labels its tiles with other numbers than 0 to {count - 1}"
    upper_record_bytes = 4 * (1 + max_m)
    levels = np.zeros(count, dtype=np.int64)
    upper_positions: list[tuple[int, int]] = []
    position = _GRAPH_HEADER.size + count * record_bytes
    for element in range(count):
        if position + _LINK_LIST_SIZE.size > len(data):
            return "ends before the upper-level links of every tile"
        (size_bytes,) = _LINK_LIST_SIZE.unpack_from(data, position)
        position += _LINK_LIST_SIZE.size
        if not size_bytes:
            continue
        level = size_bytes // upper_record_bytes
        if size_bytes % upper_record_bytes or level > max_level or position + size_bytes > len(data):
            return f"gives a tile {size_bytes} bytes of upper-level links"
        levels[element] = level
        upper_positions.append((element, position))
        position += size_bytes
    if levels.max() != max_level or levels[entry_point] != max_level:
        return (f"starts its search at tile {entry_point} of level {levels[entry_point]}, but its top level is "
                f"{max_level} and its highest tile has level {levels.max()}")
    for element, start in upper_positions:
        upper = np.frombuffer(data, dtype="<u4", count=int(levels[element]) * upper_record_bytes // 4,
                              offset=start).reshape(int(levels[element]), -1)
        upper_counts = upper[:, 0] & 0xFFFF
        if (upper_counts > max_m).any():
            return f"gives tile {element} more than {max_m} upper-level links"
        for level in range(1, int(levels[element]) + 1):
            targets = upper[level - 1, 1 : 1 + int(upper_counts[level - 1])]
            if (targets >= count).any() or (levels[targets.astype(np.int64)] < level).any():
                return f"links tile {element} on level {level} to a tile that has no such level"
    return None


def _graph_vector_problem(data: mmap.mmap, embeddings: np.ndarray, embeddings_path: Path) -> Optional[str]:
    """Return where the graph's float32 vectors differ from the stored embeddings of their tiles, or None.

    Each record contains a tile's vector at ``offset_data`` and its tile id (label). The stored
    embedding of that tile is its float16 copy. Compared in blocks, so memory stays bounded; all
    of them up to ``FULL_VECTOR_CHECK_MAX_TILES`` tiles.
    """
    header = _GRAPH_HEADER.unpack_from(data, 0)
    count, record_bytes, label_offset, offset_data = header[2], header[3], header[4], header[5]
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    if count != embeddings.shape[0] or offset_data % 4 or offset_data + 4 * dim > record_bytes:
        return f"has records that cannot hold {dim}-dim vectors"
    records = _graph_records(data, count, record_bytes)
    starts = np.arange(0, count, EXACT_SEARCH_BLOCK_ROWS)
    if count > FULL_VECTOR_CHECK_MAX_TILES:
        # Reading every vector of a larger index would make each open read both files whole.
        # Evenly spread blocks still catch a file replaced, reordered or rescaled.
        block_count = FULL_VECTOR_CHECK_MAX_TILES // EXACT_SEARCH_BLOCK_ROWS
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, block_count).astype(np.int64))]
    for start in starts.tolist():
        block = records[start : start + EXACT_SEARCH_BLOCK_ROWS]
        vectors = np.ascontiguousarray(block[:, offset_data // 4 : offset_data // 4 + dim]).view("<f4")
        labels = (block[:, label_offset // 4] | (block[:, label_offset // 4 + 1].astype(np.uint64) << np.uint64(32)))
        labels = labels.astype(np.int64)
        stop = start + len(block)
        if np.array_equal(labels, np.arange(start, stop)):
            # Builds insert tiles in order, so a block's tiles are one slice of the embeddings.
            stored = np.asarray(embeddings[start:stop], dtype=np.float32)
        else:
            stored = np.asarray(embeddings[labels], dtype=np.float32)
        differences = np.abs(stored - vectors)
        # float16 keeps about 3 decimal digits of a unit vector's components, and NaN fails the test.
        if not differences.max() <= EMBEDDING_GRAPH_TOLERANCE:
            row_differs = ~(differences.max(axis=1) <= EMBEDDING_GRAPH_TOLERANCE)
            return (f"holds another vector for tile {int(labels[np.argmax(row_differs)])} than the embeddings file "
                    f"{embeddings_path} ({int(row_differs.sum())} tiles of rows {start} to {stop - 1} differ)")
        lengths = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        if not np.abs(lengths - 1.0).max() <= NORM_TOLERANCE:
            return f"holds a vector of length {float(lengths[np.argmax(np.abs(lengths - 1.0))]):.4g}, not 1"
    return None


def _check_data_files(folder: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for kind in DATA_FILE_KINDS:
        entry = manifest["files"].get(kind)
        if not isinstance(entry, dict) or "name" not in entry or "size_bytes" not in entry:
            raise SearchIndexError(
                f"{folder / MANIFEST_NAME} does not name the {kind} file; the index is damaged, rebuild it"
            )
        name = entry["name"]
        if not isinstance(name, str) or DATA_FILE_PATTERN.match(name) is None or name.endswith(".tmp"):
            raise SearchIndexError(
                f"{folder / MANIFEST_NAME} names {name!r} as the {kind} file, which is not an index file name; "
                "the index is damaged, rebuild it"
            )
        path = folder / name
        if path.exists() and not path.is_file():
            raise SearchIndexError(f"index file {path} is a folder, not a file; the index is damaged, rebuild it")
        if not path.is_file():
            raise SearchIndexError(f"index file {path} is missing; the index is damaged, rebuild it")
        size_bytes = path.stat().st_size
        if size_bytes != entry["size_bytes"]:
            raise SearchIndexError(
                f"index file {path} has {size_bytes} bytes but the manifest expects {entry['size_bytes']}; "
                "the file was truncated or replaced, rebuild the index"
            )
        paths[kind] = path
    return paths
