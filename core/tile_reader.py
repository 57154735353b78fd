"""The tile reader thread that walks the source grids, reads chips and hands batches to the encoder.

At most ``prefetch_batches + 1`` chip batches exist at any time because ``_BatchSlots`` bounds them.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .encoder import input_gain_offset
from .parameters import SKIP_MASKED, SKIP_REASONS, BuildParameters
from .planning import _SourcePlan
from .raster import RasterSource, chip_skip_reason
from .spec import ModelSpec

# A batch is handed on after this many tiles even when few of them were embeddable, so that
# progress and cancellation keep coming through large nodata or masked areas.
MAX_TILES_PER_BATCH_FACTOR = 8

# The reader checks for a stop request this often while it waits for a free batch slot.
READER_POLL_INTERVAL_S = 0.1


# -- tile walking and reading -------------------------------------------------------------------


def _iter_source_tiles(plan: _SourcePlan, max_masked_fraction: float) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(row, col, masked)`` for every tile of a source, in row-major order."""

    def candidates() -> Iterator[tuple[int, int]]:
        return iter(plan.selected_tiles) if plan.selected_tiles is not None else plan.grid.tile_ids()

    if not plan.mask_polygons_wkt:
        for row, col in candidates():
            yield row, col, False
        return

    # tiles_outside_mask yields the unmasked tiles in the order given, so walking it in step
    # with the candidates marks the ones it dropped without testing any tile twice.
    unmasked_tiles = plan.grid.tiles_outside_mask(candidates(), plan.mask_polygons_wkt, max_masked_fraction)
    next_unmasked = next(unmasked_tiles, None)
    for tile_id in candidates():
        if tile_id == next_unmasked:
            yield tile_id[0], tile_id[1], False
            next_unmasked = next(unmasked_tiles, None)
        else:
            yield tile_id[0], tile_id[1], True


class _Batch:
    """Model input for the embeddable tiles of positions ``[start_position, end_position)``, and the skips."""

    def __init__(self, start_position: int, chips: np.ndarray, n_sources: int) -> None:
        capacity = len(chips)
        self.start_position = start_position
        self.end_position = start_position
        self.chips = chips
        self.source_positions = np.empty(capacity, dtype=np.int32)
        self.rows = np.empty(capacity, dtype=np.int32)
        self.cols = np.empty(capacity, dtype=np.int32)
        self.count = 0
        self.skipped = np.zeros((n_sources, len(SKIP_REASONS)), dtype=np.int64)

    @property
    def tile_count(self) -> int:
        return self.end_position - self.start_position

    @property
    def is_full(self) -> bool:
        return self.count == len(self.chips)


@dataclass
class _ReaderFailure:
    error: BaseException


_END_OF_TILES = object()


class _BatchSlots:
    """A counting semaphore over chip batches that records the peak number in use and recycles their arrays.

    Reusing a released batch's chip array saves the page faults of a fresh 19 MB array per
    batch of 32 chips of 224 px. Every array belongs to a slot, so the bound on memory stays.
    """

    def __init__(self, slot_count: int) -> None:
        self._semaphore = threading.Semaphore(slot_count)
        self._lock = threading.Lock()
        self._free_arrays: list[np.ndarray] = []
        self.in_use = 0
        self.peak = 0

    def chip_array(self, shape: tuple[int, ...]) -> np.ndarray:
        """Return a released float32 array of ``shape``, or a new one; call after ``acquire``."""
        with self._lock:
            while self._free_arrays:
                array = self._free_arrays.pop()
                if array.shape == shape:
                    return array
        return np.empty(shape, dtype=np.float32)

    def acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self._semaphore.acquire(timeout=READER_POLL_INTERVAL_S):
                with self._lock:
                    self.in_use += 1
                    self.peak = max(self.peak, self.in_use)
                return True
        return False

    def release(self, chips: Optional[np.ndarray] = None) -> None:
        """Free a slot, keeping ``chips`` (the released batch's array) for the next batch."""
        with self._lock:
            self.in_use -= 1
            if chips is not None:
                self._free_arrays.append(chips)
        self._semaphore.release()


class _TileReader(threading.Thread):
    """Reads chips for tile positions from ``start_position`` on and queues them as batches.

    The thread opens its own ``RasterSource`` objects, because GDAL datasets must not be shared
    between threads. Errors are passed to the consumer through the queue and raised there.
    """

    def __init__(
        self,
        plans: Sequence[_SourcePlan],
        spec: ModelSpec,
        params: BuildParameters,
        start_position: int,
        slots: _BatchSlots,
    ) -> None:
        super().__init__(name="lookalike-tile-reader", daemon=True)
        self._plans = plans
        self._spec = spec
        self._params = params
        self._start_position = start_position
        self._slots = slots
        self.batches: queue.Queue[Any] = queue.Queue(maxsize=params.prefetch_batches)
        # Batches hold model input (see OnnxEncoder.encode_model_input), not raw chips.
        self._input_transform = input_gain_offset(spec)
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            self._read_all()
        except Exception as error:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            self._put(_ReaderFailure(error))

    def stop(self) -> None:
        self.stop_event.set()
        # Unblock a reader waiting on a full queue; what it put there is discarded.
        while True:
            try:
                self.batches.get_nowait()
            except queue.Empty:
                break
        self.join()

    def _put(self, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.batches.put(item, timeout=READER_POLL_INTERVAL_S)
                return True
            except queue.Full:
                continue
        return False

    def _new_batch(self, start_position: int) -> Optional[_Batch]:
        if not self._slots.acquire(self.stop_event):
            return None
        size_px = self._spec.input_size_px
        chips = self._slots.chip_array((self._params.batch_size, self._spec.band_count, size_px, size_px))
        return _Batch(start_position, chips, len(self._plans))

    def _read_all(self) -> None:
        max_tiles_per_batch = self._params.batch_size * MAX_TILES_PER_BATCH_FACTOR
        max_masked_fraction = 1.0 - self._params.min_valid_fraction
        position = 0
        batch: Optional[_Batch] = None
        for plan in self._plans:
            if position + plan.tile_count <= self._start_position:
                position += plan.tile_count
                continue
            source = RasterSource(plan.path, plan.band_indexes)
            # GDAL keeps every block it decodes in its cache (5 % of RAM by default), which
            # would grow with the area read. Tiles come row by row, so once the reader has
            # moved a block height further down, the blocks above are not needed again.
            rows_per_flush = max(1, math.ceil(source.block_height_px * plan.pixel_size / plan.grid.stride_ground))
            last_flush_row = None
            try:
                for row, col, masked in _iter_source_tiles(plan, max_masked_fraction):
                    if position < self._start_position:
                        position += 1
                        continue
                    if last_flush_row is None:
                        last_flush_row = row
                    elif row - last_flush_row >= rows_per_flush:
                        source.release_cached_blocks()
                        last_flush_row = row
                    if batch is None:
                        batch = self._new_batch(position)
                        if batch is None:
                            return
                    self._read_tile(source, plan, row, col, masked, batch)
                    position += 1
                    batch.end_position = position
                    if batch.is_full or batch.tile_count >= max_tiles_per_batch:
                        if not self._put(batch):
                            return
                        batch = None
            finally:
                source.close()
        if batch is not None and not self._put(batch):
            return
        self._put(_END_OF_TILES)

    def _read_tile(
        self, source: RasterSource, plan: _SourcePlan, row: int, col: int, masked: bool, batch: _Batch
    ) -> None:
        if masked:
            batch.skipped[plan.position, SKIP_REASONS.index(SKIP_MASKED)] += 1
            return
        slot = batch.count
        # The chip goes straight into the batch as model input; a skipped one is overwritten.
        model_input, valid, band_std = source.read_tile(
            plan.grid.tile_bounds(row, col), plan.grid.crs_wkt, plan.grid.tile_size_px, plan.stretch,
            input_transform=self._input_transform, out=batch.chips[slot],
        )
        reason = chip_skip_reason(model_input, valid, self._spec.value_scale, plan.min_valid_fraction,
                                  band_std=band_std)
        if reason is not None:
            batch.skipped[plan.position, SKIP_REASONS.index(reason)] += 1
            return
        batch.source_positions[slot] = plan.position
        batch.rows[slot] = row
        batch.cols[slot] = col
        batch.count += 1
