"""The build pipeline (rasters to a tile index) and the query pipeline (geometries to embeddings).

Building streams tiles: a reader thread walks each source's tile grid lazily, reads chips with
GDAL and hands batches to the calling thread through a bounded queue, which encodes them with
onnxruntime while the next batch is read. GDAL and onnxruntime release the GIL, so the two
overlap. At most ``prefetch_batches + 1`` chip batches exist at any time (a semaphore bounds
them), so memory follows ``batch_size``, never the raster size.

Every finished batch is checkpointed as one chunk file in ``<index folder>.partial/``, written
by a background thread so that encoding goes on while the chunk is synced to disk. A build
that was cancelled or crashed continues from the last chunk when it is run again with the same
parameters. A hash of the parameters, the encoder checksum, the source checksums and the grids
decides what "the same" means. The index itself is written by ``TileIndex`` at the end, once
the chunks are known to cover every tile, and the partial folder is removed after that.

Tile bookkeeping: every tile of the grids (restricted to the extent) is counted once in
``tiles_total``, and is either embedded or skipped for one reason (masked, mostly invalid,
blank), so ``tiles_embedded + tiles_skipped == tiles_total``.

This module runs the build and re-exports the public names of the other parts, so callers
import everything from here. The parts are ``parameters`` (parameters, reports, limits and WKT
helpers), ``planning`` (per-source grids and the build id), ``tile_reader`` (the reader thread),
``checkpoints`` (the ``.partial`` store) and ``query`` (``embed_query``, ``run_search``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import get_logger
from .checkpoints import (
    CHUNK_PREFIX,
    CHUNK_SUFFIX,
    PARTIAL_FORMAT,
    PARTIAL_FORMAT_VERSION,
    PARTIAL_MARKER_NAME,
    PARTIAL_SUFFIX,
    _Chunk,
    _ChunkLayout,
    _ChunkWriter,
    _PartialBuild,
    _read_partial_marker,
    partial_folder_for,
)
from .encoder import OnnxEncoder, cpu_lacks_vnni, default_model_path, is_quantized_model
from .errors import CancelledError, LookalikeError, SearchIndexError
from .grid import TileGrid
from .index import (
    FOLDER_DAMAGED_INDEX,
    FOLDER_FOREIGN,
    FOLDER_INDEX,
    MANIFEST_NAME,
    IndexSavedElsewhereError,
    TileIndex,
    enclosing_index_folder,
    index_damage,
    index_folder_state,
    lookalike_folder_kind,
    make_tile_table,
    path_from_index,
    read_manifest_json,
)
from .lock import index_lock
from .parameters import (
    DEFAULT_MAX_TILE_COUNT,
    DEFAULT_TILE_SIZE_SOURCE_PX,
    MIN_DEFAULT_TILE_SIZE_SOURCE_PX,
    MIN_SOURCE_PIXELS_PER_TILE,
    MIN_TILE_SIZE_SOURCE_PX,
    SKIP_MASKED,
    SKIP_REASONS,
    BuildParameters,
    BuildReport,
    CancelCheck,
    Geometry,
    PathLike,
    Progress,
    ProgressCallback,
    Region,
    transform_geometry_wkt,
)
from .planning import _build_id, _build_settings, _plan_sources, _SourcePlan
from .query import (
    MAX_QUERY_TILES,
    QueryChips,
    embed_query,
    index_encoder_path,
    indexed_source_for_geometry,
    run_search,
    search_query_chips,
)
from .raster import SKIP_BLANK, SKIP_MOSTLY_INVALID
from .search import overlap_fraction
from .tile_reader import (
    _END_OF_TILES,
    MAX_TILES_PER_BATCH_FACTOR,
    READER_POLL_INTERVAL_S,
    _Batch,
    _BatchSlots,
    _ReaderFailure,
    _TileReader,
)

__all__ = [
    "CHUNK_PREFIX",
    "CHUNK_SUFFIX",
    "DEFAULT_MAX_TILE_COUNT",
    "DEFAULT_TILE_SIZE_SOURCE_PX",
    "MAX_QUERY_TILES",
    "MAX_TILES_PER_BATCH_FACTOR",
    "MIN_DEFAULT_TILE_SIZE_SOURCE_PX",
    "MIN_SOURCE_PIXELS_PER_TILE",
    "MIN_TILE_SIZE_SOURCE_PX",
    "PARTIAL_FORMAT",
    "PARTIAL_FORMAT_VERSION",
    "PARTIAL_MARKER_NAME",
    "PARTIAL_SUFFIX",
    "READER_POLL_INTERVAL_S",
    "SKIP_MASKED",
    "SKIP_REASONS",
    "BuildParameters",
    "BuildReport",
    "CancelCheck",
    "Geometry",
    "PathLike",
    "Progress",
    "ProgressCallback",
    "QueryChips",
    "Region",
    "build_index",
    "discarded_checkpoints_warning",
    "embed_query",
    "index_encoder_path",
    "indexed_source_for_geometry",
    "partial_folder_for",
    "run_search",
    "search_query_chips",
    "transform_geometry_wkt",
]

LOGGER = get_logger("pipeline")

# Share of the smaller grid's area above which a raster added again counts as covering a part
# indexed before. Neighbouring extents share only the strip where their edge tiles reach across.
GRID_OVERLAP_MAX_SHARE = 0.5

# Tiles per graph insert at commit. hnswlib spreads each insert over every core, so larger inserts
# wait less: 2,609 NAIP tiles took 0.45 s in inserts of 32 and 0.34 s in inserts of 1,024 (2 cores).
COMMIT_ADD_TILES = 1024


# -- building -----------------------------------------------------------------------------------


def _encoder_info(encoder: OnnxEncoder) -> dict[str, Any]:
    spec = dataclasses.asdict(encoder.spec)
    return {
        "name": encoder.name,
        "checksum": encoder.checksum,
        "embedding_dim": encoder.spec.embedding_dim,
        "spec": json.loads(json.dumps(spec)),
    }


def _encoder_should_spin(encoder_path: PathLike) -> bool:
    """Tell whether the build's encoder threads should spin between operators instead of sleeping.

    The tile reader and the checkpoint writer share the cores with the encoder, and spinning
    workers kept those cores busy. Measured on 2 CPUs, 2,609 NAIP tiles, alternating builds. On a
    Xeon with VNNI, 6 of 8 int8 builds were faster without spinning (median 246 against 223
    tiles/s). On an AMD EPYC without VNNI, fp32 builds took a median 19.3 s without and 20.4 s
    with spinning. The int8 encoder's exact u8 x u8 products on that EPYC (see
    X64_QUANT_PRECISION_CONFIG_KEY) took 17.8 s without and 16.0 s with spinning, faster in each of
    4 builds. So a quantized model spins on x86 CPUs without VNNI.
    """
    return cpu_lacks_vnni() is True and is_quantized_model(encoder_path)


def _check_index_folder(params: BuildParameters) -> Optional[TileIndex]:
    """Check ``index_folder`` before any work; return the open index when adding to it."""
    _reject_unusable_folder(params)
    return TileIndex.open(params.index_folder) if params.add_to_existing else None


def _reject_unusable_folder(params: BuildParameters) -> None:
    """Raise ``SearchIndexError`` when the build may not write ``index_folder``; reads no index data."""
    folder = Path(params.index_folder)
    if folder.exists() and not folder.is_dir():
        raise SearchIndexError(f"index folder {folder} is a file; choose a folder path for the index.")
    if folder.is_symlink() and not folder.exists():
        raise SearchIndexError(
            f"index folder {folder} is a symbolic link to {os.readlink(folder)}, which does not exist; create "
            "that folder or choose another path for the index."
        )
    nearest_existing = next((place for place in folder.parents if os.path.lexists(place)), None)
    if nearest_existing is not None and not nearest_existing.is_dir():
        raise SearchIndexError(
            f"index folder {folder} cannot be created because {nearest_existing} is a file, not a folder; "
            "choose another path for the index."
        )
    enclosing = enclosing_index_folder(folder)
    if enclosing is not None:
        raise SearchIndexError(
            f"index folder {folder} is inside {lookalike_folder_kind(enclosing)} {enclosing}, whose files a save "
            "there could be mixed with or which is deleted whole later; choose a folder outside it."
        )
    writable_place = next((place for place in (folder, *folder.parents) if place.exists()), None)
    if writable_place is not None and not os.access(writable_place, os.W_OK):
        # Found before any tile is read: the save at the end would fail after all the embedding.
        raise SearchIndexError(
            f"cannot write in {writable_place}, where the index {folder} would be saved; choose a folder "
            "you can write to."
        )
    state = index_folder_state(folder)
    has_index = state == FOLDER_INDEX
    if state == FOLDER_FOREIGN:
        # Another program's files or manifest.json: the folder is the user's and is never written to.
        if (folder / MANIFEST_NAME).is_file():
            raise SearchIndexError(
                f"folder {folder} is not a Lookalike index: its {MANIFEST_NAME} is not a Lookalike manifest "
                "(no \"format\": \"lookalike-index\"); choose a new or empty folder for the index."
            )
        raise SearchIndexError(
            f"folder {folder} is not empty and contains no Lookalike index ({MANIFEST_NAME} is missing); "
            "choose a new or empty folder for the index."
        )
    if state == FOLDER_DAMAGED_INDEX and not params.overwrite_existing_index:
        raise SearchIndexError(
            f"the index in {folder} is damaged ({MANIFEST_NAME} cannot be read); set overwrite_existing_index "
            "to build it again there, or choose another folder."
        )
    if params.add_to_existing and not has_index:
        raise SearchIndexError(
            f"add_to_existing is set but {folder} contains no index; build a new index there first "
            "or clear add_to_existing."
        )


def build_index(
    params: BuildParameters,
    progress: Optional[ProgressCallback] = None,
    is_cancelled: Optional[CancelCheck] = None,
) -> BuildReport:
    """Embed every tile of the sources and write (or extend) the index in ``params.index_folder``.

    ``progress`` is called from this thread after every batch. ``is_cancelled`` is polled before
    every batch; when it returns True the build stops, keeps its checkpoints and raises
    CancelledError. Running the same parameters again resumes from the checkpoints.

    Raises:
        CancelledError: ``is_cancelled`` returned True.
        IndexLockedError: another build or save holds ``<index folder>.lock``.
        LookalikeError: invalid parameters, an unreadable raster or encoder, an index folder that
            must not be written, sources already in the index, a tile size below
            ``MIN_TILE_SIZE_SOURCE_PX`` source pixels, a plan with more tiles than the rasters'
            pixels justify or than ``max_tile_count``, or a build in which no tile was embedded
            (then nothing is written and the checkpoints are removed).
    """
    # Refusing a folder before taking the lock leaves no lock file beside a folder that is not
    # ours. The checks run again under the lock, so two builds cannot both find the folder free.
    _reject_unusable_folder(params)
    folder = Path(params.index_folder)
    # Checkpoints there before this build (of another build, or a folder that is not ours) are
    # not its own writing, so a build that stops at them leaves no lock file either.
    partial_existed = partial_folder_for(folder).exists()

    def wrote_nothing() -> bool:
        # Rejected parameters or rasters: no checkpoints of this build, and no folder or only the
        # empty one the analyst made for the index.
        folder_is_empty = not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
        return folder_is_empty and (partial_existed or not partial_folder_for(folder).exists())

    with index_lock(folder, discard_file_if=wrote_nothing):
        return _build_index_locked(params, progress, is_cancelled)


def _build_index_locked(
    params: BuildParameters,
    progress: Optional[ProgressCallback],
    is_cancelled: Optional[CancelCheck],
) -> BuildReport:
    started_at = time.monotonic()
    encoder_path = params.encoder_path or default_model_path()
    encoder = OnnxEncoder(encoder_path, batch_size=params.batch_size, intra_op_threads=params.encoder_threads,
                          spin_between_operators=_encoder_should_spin(encoder_path))
    existing_index = _check_index_folder(params)
    if existing_index is not None:
        existing_index.check_encoder(encoder.name, encoder.checksum, purpose="add")
    existing_grid = _first_grid(existing_index)
    warnings: list[str] = []
    plans = _plan_sources(params, encoder.spec, existing_grid, warnings)
    settings = _build_settings(params, encoder, plans)
    build_id = _build_id(settings)
    partial_folder = partial_folder_for(params.index_folder)

    finished = _finished_report(params, plans, build_id, partial_folder, encoder, started_at)
    if finished is not None:
        finished.warnings = warnings
        return finished
    if existing_index is not None:
        _check_not_indexed_yet(existing_index, plans)
    elif index_folder_state(Path(params.index_folder)) == FOLDER_INDEX and not params.overwrite_existing_index:
        damage = index_damage(Path(params.index_folder))
        if damage is not None:
            raise SearchIndexError(
                f"{params.index_folder} contains a damaged index ({damage}); set overwrite_existing_index to "
                "replace it, or choose another folder."
            )
        raise SearchIndexError(
            f"{params.index_folder} already contains an index; set add_to_existing to add these rasters "
            "to it, overwrite_existing_index to replace it, or choose another folder."
        )

    tiles_total = sum(plan.tile_count for plan in plans)
    layout = _ChunkLayout(
        tiles_total,
        tuple((plan.grid.n_rows, plan.grid.n_cols) for plan in plans),
        encoder.spec.embedding_dim,
        tuple(None if plan.selected_tiles is None
              else np.array([row * plan.grid.n_cols + col for row, col in plan.selected_tiles], dtype=np.int64)
              for plan in plans),
    )
    partial = _PartialBuild.open_or_create(partial_folder, build_id, layout, settings,
                                           discard_other_build=params.discard_other_checkpoints)
    if partial.discarded_other_build:
        warnings.append(discarded_checkpoints_warning(partial_folder))
    start_position, embedded, skipped = partial.resume_state(len(plans))
    if partial.discarded_chunk_count:
        warnings.append(
            f"{partial.discarded_chunk_count} checkpoint file(s) in {partial.folder} were damaged or out of order, so "
            f"the build resumes at tile {start_position} of {tiles_total} and reads the later tiles again."
        )
    if start_position:
        LOGGER.info("Resuming the build of %s at tile %d of %d from %s", params.index_folder,
                    start_position, tiles_total, partial.folder)

    try:
        peak_batches, zero_embedding_tiles = _embed_tiles(
            plans, encoder, params, partial, start_position, embedded, skipped, tiles_total, progress, is_cancelled
        )
    except Exception as error:
        # A failure before the first chunk leaves nothing to resume from, so nothing of this build
        # stays on disk. A cancelled build keeps its folder, which its message names.
        if not isinstance(error, CancelledError) and not partial.chunk_paths():
            _remove_empty_checkpoints(partial)
        raise
    # The graph is built after the last batch, once the chip batches are freed. Built while they
    # were in flight, its arrays and theirs fragmented the heap: a build of 3,483 tiles peaked
    # 63 MiB above one of 221 tiles, against 19 MiB when built here.
    growing = _GrowingIndex(params, encoder, plans, build_id, existing_index, tiles_total)
    for chunk in partial.load_chunks():
        growing.add_chunk(chunk)
    growing.flush()
    _check_checkpoints_complete(partial, growing.end_position, tiles_total)
    if not growing.embedded_by_source.any():
        # Nothing is committed: an empty index would look like a valid one to a later search.
        partial.remove()
        raise LookalikeError(
            _nothing_embedded_message(params, plans, growing.skipped, encoder.name, zero_embedding_tiles)
        )
    warnings.extend(_empty_source_warnings(plans, growing.embedded_by_source, growing.skipped))
    try:
        source_ids = growing.save()
    except IndexSavedElsewhereError as error:
        # Only possible when the folder's lock file was removed while this build ran.
        raise SearchIndexError(
            f"Another build or program saved an index in {params.index_folder} while this build ran (was the "
            f"lock file {params.index_folder}.lock removed?), so this build did not replace it. Its tiles are kept "
            f"in {partial.folder}; run the build again, which commits them or says how to add them to that index."
        ) from error
    try:
        partial.remove()
    except OSError as error:
        # The index is saved; the next run of this build finds it and removes the checkpoints.
        LOGGER.warning("The index in %s is saved, but its checkpoints %s could not be removed (%s); delete "
                       "that folder or run the build again to remove them", params.index_folder, partial.folder, error)

    # The saved manifest contains the counts. Opening the index again would read the whole graph
    # and the embeddings once more.
    saved = read_manifest_json(Path(params.index_folder) / MANIFEST_NAME) or {}
    _, embedded, skipped = _totals_from_sources(saved.get("sources", []), build_id, len(plans))
    elapsed_s = time.monotonic() - started_at
    processed = tiles_total - start_position
    report = BuildReport(
        index_folder=params.index_folder,
        source_ids=source_ids,
        grids=[plan.grid for plan in plans],
        tiles_total=tiles_total,
        tiles_embedded=embedded,
        skipped_by_reason=_skips_by_reason(skipped),
        tiles_resumed=start_position,
        elapsed_s=elapsed_s,
        rate_tiles_per_s=processed / elapsed_s if elapsed_s > 0 else 0.0,
        peak_batches_in_memory=peak_batches,
        encoder_name=encoder.name,
        band_indexes=[plan.band_indexes for plan in plans],
        warnings=warnings,
    )
    LOGGER.info(
        "Built %s: %d tiles embedded, %d skipped (%s), in %.1f s (%.1f tiles/s)",
        params.index_folder, report.tiles_embedded, report.tiles_skipped, describe_skipped(report.skipped_by_reason)
        or "none",
        elapsed_s, report.rate_tiles_per_s,
    )
    return report


def discarded_checkpoints_warning(partial_folder: PathLike) -> str:
    """Return the build warning for checkpoints of another build that discard_other_checkpoints discarded."""
    return (
        f"The checkpoints of an interrupted build in {partial_folder} were made with other parameters, rasters "
        "or encoder than this build, so they were discarded and every tile is read again."
    )


def _remove_empty_checkpoints(partial: _PartialBuild) -> None:
    try:
        partial.remove()
    except OSError as error:
        # The error that stopped the build is the one to report.
        LOGGER.warning("The empty checkpoint folder %s could not be removed: %s", partial.folder, error)


def _check_checkpoints_complete(partial: _PartialBuild, end_position: int, tiles_total: int) -> None:
    if end_position != tiles_total:
        raise LookalikeError(
            f"the checkpoints in {partial.folder} cover tiles 0 to {end_position} of {tiles_total}: a chunk "
            "after them could not be read. Run the build again with the same parameters; it embeds those "
            "tiles again."
        )


# The skip reasons as a message names them; the manifest keeps the short keys.
SKIP_REASON_WORDS = {
    SKIP_MASKED: "masked",
    SKIP_MOSTLY_INVALID: "mostly nodata or off the raster",
    SKIP_BLANK: "blank",
}


def _describe_skips(counts: np.ndarray) -> str:
    return ", ".join(f"{int(count)} {SKIP_REASON_WORDS[reason]}" for reason, count in zip(SKIP_REASONS, counts)
                     if count)


def describe_skipped(skipped_by_reason: Mapping[str, int]) -> str:
    """Return skip counts in words, such as "5 mostly nodata or off the raster, 2 blank"; empty when none."""
    return ", ".join(f"{count} {SKIP_REASON_WORDS.get(reason, reason)}"
                     for reason, count in skipped_by_reason.items() if count)


def _skip_advice(params: BuildParameters, plan: _SourcePlan, counts: np.ndarray) -> str:
    """Return why every tile of ``plan`` was skipped and what to change, from the main skip reason."""
    if not counts.any():
        # No tile was skipped either: the extent selected none of the raster's tiles.
        return "the extent selects none of its tiles; draw the extent over the raster, or leave it unset"
    dominant = SKIP_REASONS[int(np.argmax(counts))]
    if dominant == SKIP_MASKED:
        return "the mask covers every tile; shrink the mask or leave it unset"
    if plan.tile_size_source_px > max(plan.width_px, plan.height_px):
        # Checked before the blank reason: a raster of a few pixels stretched over a tile can come out uniform.
        fitting_px = min(plan.width_px, plan.height_px)
        advice = (
            f"use tiles that fit inside it (tile_size_source_px from {MIN_TILE_SIZE_SOURCE_PX:g} to {fitting_px})"
            if fitting_px >= MIN_TILE_SIZE_SOURCE_PX else "try another tile size (tile_size_source_px)"
        )
        return (
            f"tile size {plan.tile_size_source_px:.4g} source px is larger than the raster "
            f"({plan.width_px}x{plan.height_px} px), and its only tiles were skipped as {dominant}; {advice}"
        )
    if dominant == SKIP_BLANK:
        return "most tiles are uniform (a fill value or cloud); check the band selection and the nodata value"
    return (
        f"most tiles have less than {100 * params.min_valid_fraction:.0f} % valid pixels; check that the raster's "
        "nodata value does not mark image pixels (a raster of nodata only has nothing to index), or use smaller "
        "tiles so that more of them fit inside the valid area"
    )


def _nothing_embedded_message(
    params: BuildParameters,
    plans: Sequence[_SourcePlan],
    skipped: np.ndarray,
    encoder_name: str,
    zero_embedding_tiles: int,
) -> str:
    totals = skipped.sum(axis=0)
    # With one raster its own sentence below gives the counts.
    counts = f" (skipped: {_describe_skips(totals) or 'none'})" if len(plans) > 1 else ""
    parts = [f"0 tiles embedded into {params.index_folder}{counts}, so no index was written."]
    if zero_embedding_tiles:
        # The data is then not to blame, so the model is named before the per-raster advice.
        parts.append(
            f"The encoder '{encoder_name}' returned all-zero embeddings for {zero_embedding_tiles} tiles, "
            "counted as blank; check that it is an image encoder whose input matches its spec, or choose "
            "another encoder."
        )
    for plan in plans:
        counts = skipped[plan.position]
        parts.append(
            f"Raster {plan.path!r}: {_describe_skips(counts) or 'no tiles'}; {_skip_advice(params, plan, counts)}."
        )
    return " ".join(parts)


def _empty_source_warnings(
    plans: Sequence[_SourcePlan], embedded_by_source: np.ndarray, skipped: np.ndarray
) -> list[str]:
    warnings = []
    for plan in plans:
        # A raster with no tile to read lies outside the extent, which planning already warned about.
        if embedded_by_source[plan.position] or not plan.tile_count:
            continue
        warning = (
            f"Raster {plan.path!r} contributed 0 tiles ({_describe_skips(skipped[plan.position]) or 'no tiles'}); "
            "search will never return it. Check its nodata value, the extent and the mask."
        )
        LOGGER.warning("%s", warning)
        warnings.append(warning)
    return warnings


def _first_grid(index: Optional[TileIndex]) -> Optional[TileGrid]:
    if index is None or not index.sources:
        return None
    return TileGrid.from_dict(index.sources[0]["grid"])


def _check_not_indexed_yet(index: TileIndex, plans: Sequence[_SourcePlan]) -> None:
    """Raise when a raster to add is already in ``index`` where its tiles would repeat places indexed before."""
    for plan in plans:
        for record in index.sources:
            indexed_path = str(record.get("path", ""))
            same_path = _same_file_path(indexed_path, plan.path)
            same_content = record.get("checksum") == plan.record["checksum"]
            if same_path and not same_content:
                # Its earlier tiles stay in the index, so adding it again would list each place twice.
                raise SearchIndexError(
                    f"raster {plan.path!r} is already in index {index.folder} (source {record['id']}) and has "
                    "changed since it was indexed. To search its new content, build the index again with "
                    "overwrite_existing_index, or save the new content under another file name and add that."
                )
            if not same_content:
                continue
            subject = f"raster {plan.path!r} is already in index {index.folder}"
            if not same_path:
                # The checksum covers the pixels, so a copy under another name is the same raster.
                subject = (f"raster {plan.path!r} has the same content as {indexed_path!r}, which is already in "
                           f"index {index.folder}")
            if record.get("grid") == plan.grid.to_dict():
                raise SearchIndexError(
                    f"{subject} with the same grid (source {record['id']}), with bands {record.get('band_indexes')}. "
                    "Leave it out of the rasters to add; to index it with other bands, build a separate index."
                )
            if _grids_overlap(TileGrid.from_dict(record["grid"]), plan.grid):
                # Another extent of the same raster: a part of it is indexed already, on a shifted grid.
                raise SearchIndexError(
                    f"{subject} (source {record['id']}), and the extent to add overlaps the part indexed then, so "
                    "those places would be indexed twice. Choose an extent that leaves that part out, or build the "
                    "index again with overwrite_existing_index and an extent that covers every part you need."
                )


def _grids_overlap(first: TileGrid, second: TileGrid) -> bool:
    """Return whether two grids share more than half of the smaller one's area; other CRSs count as overlapping.

    Each grid reaches up to a tile past its extent, so the grids of two neighbouring extents of one
    raster share a strip up to a tile wide, which counts only when one of the grids is that narrow.
    """
    if first.crs_wkt != second.crs_wkt:
        return True
    return overlap_fraction(first.bounds, second.bounds) > GRID_OVERLAP_MAX_SHARE


def _same_file_path(first: str, second: str) -> bool:
    return os.path.normcase(os.path.abspath(first)) == os.path.normcase(os.path.abspath(second))


def _finished_report(
    params: BuildParameters,
    plans: Sequence[_SourcePlan],
    build_id: str,
    partial_folder: Path,
    encoder: OnnxEncoder,
    started_at: float,
) -> Optional[BuildReport]:
    """Return a report when the index already contains this build's tiles, or None.

    That is the case after an earlier run committed the index but stopped before removing its
    checkpoints, and when a finished build is run again. A run with ``overwrite_existing_index``,
    or with HNSW parameters other than the index's, is never finished here: it replaces the
    index as requested, or is rejected by the caller.
    """
    if index_folder_state(Path(params.index_folder)) != FOLDER_INDEX:
        return None
    # With overwrite requested, or other HNSW parameters, the index is built again: from the
    # checkpoints when they are complete, which costs only the commit.
    if params.overwrite_existing_index or not _same_graph_parameters(params):
        return None
    has_checkpoints = partial_folder.exists()
    try:
        source_ids, embedded, skipped = _totals_from_index(params.index_folder, build_id, len(plans))
    except SearchIndexError as error:
        # A damaged index contains no finished build, and only overwrite_existing_index replaces it.
        LOGGER.info("Not reusing the index in %s: %s", params.index_folder, error)
        return None
    if not source_ids:
        return None
    if has_checkpoints:
        LOGGER.info("The build of %s was already committed; removing its checkpoints %s",
                    params.index_folder, partial_folder)
        if (_read_partial_marker(partial_folder / PARTIAL_MARKER_NAME) or {}).get("build_id") == build_id:
            _PartialBuild(partial_folder, build_id).remove()
    else:
        LOGGER.info("%s already contains the tiles of this build; nothing to do", params.index_folder)
    tiles_total = sum(plan.tile_count for plan in plans)
    return BuildReport(
        index_folder=params.index_folder,
        source_ids=source_ids,
        grids=[plan.grid for plan in plans],
        tiles_total=tiles_total,
        tiles_embedded=embedded,
        skipped_by_reason=_skips_by_reason(skipped),
        # Only checkpoints left behind mean that an earlier run was interrupted.
        tiles_resumed=tiles_total if has_checkpoints else 0,
        elapsed_s=time.monotonic() - started_at,
        rate_tiles_per_s=0.0,
        peak_batches_in_memory=0,
        encoder_name=encoder.name,
        already_complete=True,
    )


def _same_graph_parameters(params: BuildParameters) -> bool:
    """Tell whether the index in ``params.index_folder`` has the HNSW parameters that ``params`` requests."""
    if params.add_to_existing:
        # Added tiles go into the index's own graph, whatever HNSW parameters were passed.
        return True
    stored = read_manifest_json(Path(params.index_folder) / MANIFEST_NAME) or {}
    hnsw = stored.get("hnsw") if isinstance(stored.get("hnsw"), dict) else {}
    return hnsw.get("m") == params.hnsw_m and hnsw.get("ef_construction") == params.hnsw_ef_construction


def _totals_from_index(index_folder: str, build_id: str, n_sources: int) -> tuple[list[int], int, np.ndarray]:
    return _totals_from_sources(TileIndex.open(index_folder).sources, build_id, n_sources)


def _totals_from_sources(
    sources: Sequence[dict[str, Any]], build_id: str, n_sources: int
) -> tuple[list[int], int, np.ndarray]:
    records = [record for record in sources if record.get("build_id") == build_id]
    skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)
    embedded = 0
    for position, record in enumerate(records[:n_sources]):
        embedded += int(record.get("tile_count", 0))
        counts = record.get("skipped_counts", {})
        skipped[position] = [int(counts.get(reason, 0)) for reason in SKIP_REASONS]
    return [int(record["id"]) for record in records], embedded, skipped


def _skips_by_reason(skipped: np.ndarray) -> dict[str, int]:
    totals = skipped.sum(axis=0) if skipped.size else np.zeros(len(SKIP_REASONS), dtype=np.int64)
    return {reason: int(count) for reason, count in zip(SKIP_REASONS, totals)}


def _embed_tiles(
    plans: Sequence[_SourcePlan],
    encoder: OnnxEncoder,
    params: BuildParameters,
    partial: _PartialBuild,
    start_position: int,
    embedded: int,
    skipped: np.ndarray,
    tiles_total: int,
    progress: Optional[ProgressCallback],
    is_cancelled: Optional[CancelCheck],
) -> tuple[int, int]:
    """Encode and checkpoint every tile from ``start_position`` on.

    Returns the peak number of chip batches in memory and the tiles whose embedding was all zeros.
    """
    if start_position >= tiles_total:
        return 0, 0
    # One batch more than the queue holds: the one the encoder is working on.
    slots = _BatchSlots(params.prefetch_batches + 1)
    reader = _TileReader(plans, encoder.spec, params, start_position, slots)
    writer = _ChunkWriter(partial)
    run_started_at = time.monotonic()
    position = start_position
    skipped_total = int(skipped.sum())
    zero_embedding_tiles = 0
    all_written = False
    reader.start()
    try:
        while True:
            if is_cancelled is not None and is_cancelled():
                raise CancelledError(
                    f"The build of {params.index_folder} was cancelled after {position} of {tiles_total} "
                    f"tiles; run it again with the same parameters to continue from {partial.folder}."
                )
            item = _next_batch(reader)
            if item is _END_OF_TILES:
                break
            if isinstance(item, _ReaderFailure):
                raise item.error
            batch: _Batch = item
            del item
            try:
                if batch.count:
                    embeddings = encoder.encode_model_input(batch.chips[: batch.count])
                else:
                    embeddings = np.empty((0, encoder.spec.embedding_dim), dtype=np.float32)
                # The batch's own arrays are new for every batch; only its chip array is reused.
                chunk, zero_count = _without_zero_embeddings(_Chunk(
                    batch.start_position, batch.end_position, batch.source_positions[: batch.count],
                    batch.rows[: batch.count], batch.cols[: batch.count], embeddings, batch.skipped,
                ))
                zero_embedding_tiles += zero_count
                writer.write(chunk)
                position = batch.end_position
                embedded += len(chunk.rows)
                skipped_total += int(chunk.skipped.sum())
            finally:
                # The batch is dropped before its slot is freed, and its chip array goes back to
                # the slots for reuse, so no more arrays exist than slots.
                chips = batch.chips
                del batch
                slots.release(chips)
                del chips
            if progress is not None:
                progress(_progress(position, tiles_total, skipped_total, start_position, run_started_at))
        writer.finish()
        all_written = True
    finally:
        reader.stop()
        if not all_written:
            _finish_writes_after_error(writer, partial)
    return slots.peak, zero_embedding_tiles


def _without_zero_embeddings(chunk: _Chunk) -> tuple[_Chunk, int]:
    """Count tiles whose embedding is all zeros as blank instead of storing them; also return their number.

    An all-zero embedding has no direction to compare, so the index rejects it. A model that
    returns one for a chip would return it again on every run, so the tile is skipped here.
    """
    is_zero = ~np.any(chunk.embeddings != 0, axis=1)
    zero_count = int(is_zero.sum())
    if not zero_count:
        return chunk, 0
    LOGGER.warning("The encoder returned all-zero embeddings for %d tiles; they are counted as blank",
                   int(is_zero.sum()))
    skipped = chunk.skipped.copy()
    np.add.at(skipped, (chunk.source_positions[is_zero], SKIP_REASONS.index(SKIP_BLANK)), 1)
    keep = ~is_zero
    return _Chunk(chunk.start_position, chunk.end_position, chunk.source_positions[keep], chunk.rows[keep],
                  chunk.cols[keep], chunk.embeddings[keep], skipped), zero_count


def _finish_writes_after_error(writer: _ChunkWriter, partial: _PartialBuild) -> None:
    """Let the chunks already handed over reach the disk, so that a cancelled build resumes after them."""
    try:
        writer.finish()
    except Exception as error:  # noqa: BLE001 - the error that stopped the build is the one raised
        LOGGER.warning("A checkpoint in %s could not be written either (%s); those tiles are read again "
                       "when the build is resumed", partial.folder, error)


def _next_batch(reader: _TileReader) -> Any:
    while True:
        try:
            return reader.batches.get(timeout=READER_POLL_INTERVAL_S)
        except queue.Empty:
            # The reader always queues an end marker or its error; a thread killed without
            # either (e.g. by SystemExit) would otherwise block this loop for ever.
            if not reader.is_alive() and reader.batches.empty():
                raise LookalikeError(
                    "The tile reader thread stopped without finishing or reporting an error; run the "
                    "build again to continue from its checkpoints."
                ) from None


def _progress(position: int, tiles_total: int, skipped_total: int, start_position: int,
              run_started_at: float) -> Progress:
    elapsed_s = time.monotonic() - run_started_at
    processed = position - start_position
    rate = processed / elapsed_s if elapsed_s > 0 else 0.0
    eta_s = (tiles_total - position) / rate if rate > 0 else None
    return Progress(
        tiles_done=position,
        tiles_total=tiles_total,
        tiles_skipped=skipped_total,
        rate_tiles_per_s=rate,
        eta_s=eta_s,
    )


class _GrowingIndex:
    """The index this build writes, filled chunk by chunk from the checkpoints, with its tile counts.

    Nothing reaches the index folder before :meth:`save`, so a build that fails leaves the folder
    as it was: no index, or the index being added to or replaced, untouched. The counts come from
    the same reading of the chunks that fills the graph. A separate pass over the chunks for them
    took 0.07 to 0.13 s of a 9 to 11.5 s build (2,609 NAIP tiles, 2 cores).
    """

    def __init__(
        self,
        params: BuildParameters,
        encoder: OnnxEncoder,
        plans: Sequence[_SourcePlan],
        build_id: str,
        existing_index: Optional[TileIndex],
        tiles_total: int,
    ) -> None:
        if existing_index is not None:
            self.index = existing_index
        else:
            self.index = TileIndex.create(
                Path(params.index_folder),
                _encoder_info(encoder),
                m=params.hnsw_m,
                ef_construction=params.hnsw_ef_construction,
                build_parameters={**params.to_dict(), "build_id": build_id},
                overwrite=params.overwrite_existing_index,
                # Sized once for every tile of the plan, instead of doubling as the tiles arrive.
                # hnswlib touches the memory of a tile only when the tile is inserted.
                initial_capacity_tiles=max(1, tiles_total),
                save_empty=False,
            )
        self._plans = plans
        self.source_ids = [
            self.index.add_source({**plan.record, "build_id": build_id,
                                   "path_from_index": path_from_index(plan.record["path"], params.index_folder)})
            for plan in plans
        ]
        self._source_id_array = np.asarray(self.source_ids, dtype=np.int32)
        self.embedded_by_source = np.zeros(len(plans), dtype=np.int64)
        self.skipped = np.zeros((len(plans), len(SKIP_REASONS)), dtype=np.int64)
        self.end_position = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_tiles = 0

    def add_chunk(self, chunk: _Chunk) -> None:
        """Take the tiles of the next chunk, which :meth:`flush` inserts in blocks.

        ``_PartialBuild.load_chunks`` yields the chunks in tile order and stops at a gap, so each
        chunk continues where the one before ended.
        """
        if len(chunk.rows):
            tiles = make_tile_table(0, chunk.rows, chunk.cols)
            tiles["source_id"] = self._source_id_array[chunk.source_positions]
            self._pending.append((chunk.embeddings, tiles))
            self._pending_tiles += len(tiles)
            if self._pending_tiles >= COMMIT_ADD_TILES:
                self.flush()
            self.embedded_by_source += np.bincount(chunk.source_positions, minlength=len(self._plans))
        self.skipped += chunk.skipped
        self.end_position = chunk.end_position

    def flush(self) -> None:
        """Insert the tiles added since the last insert into the graph."""
        if self._pending:
            self.index.add(np.concatenate([embeddings for embeddings, _ in self._pending]),
                           np.concatenate([tiles for _, tiles in self._pending]))
            self._pending, self._pending_tiles = [], 0

    def save(self) -> list[int]:
        """Record the skip counts, write the index and return the new source ids."""
        for plan, source_id in zip(self._plans, self.source_ids):
            counts = {reason: int(count) for reason, count in zip(SKIP_REASONS, self.skipped[plan.position])}
            self.index.update_source(source_id, {"skipped_counts": counts})
        self.index.save()
        return self.source_ids

