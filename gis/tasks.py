"""Background jobs as ``QgsTask``: run the work off the GUI thread, report on the GUI thread.

``run()`` executes in a worker thread of the task manager and touches no widget, layer or
project. It stores an explicit outcome (succeeded, failed or cancelled) and the exception, and
``finished()``, which the task manager calls on the main thread, hands the task to a callback.
Tasks that read a QGIS raster through a provider get a clone made on the main thread.
"""

from __future__ import annotations

import enum
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..core import get_logger
from ..core.errors import CancelledError, LookalikeError

LOGGER = get_logger("gis.tasks")


class TaskOutcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TileProgress:
    """Progress of a tiled job as the dock shows it; ``rate`` in tiles per second."""

    tiles_done: int
    tiles_total: int
    tiles_skipped: int = 0
    rate_tiles_per_s: float = 0.0
    eta_s: Optional[float] = None

    @property
    def percent(self) -> float:
        # A job can learn its total late, or have none, so a zero total reports 0 %.
        if self.tiles_total <= 0:
            return 0.0
        return min(100.0, 100.0 * self.tiles_done / self.tiles_total)


class LookalikeTask(QgsTask):
    """A task that runs ``work(task)`` and passes itself to ``on_finished`` on the main thread.

    After ``finished()``: ``outcome`` is a :class:`TaskOutcome`, ``result`` is what ``work``
    returned (on success), ``error`` the exception (on failure) and ``error_details`` its
    traceback. ``work`` may raise ``CancelledError`` or return after ``isCanceled()``; both end
    as CANCELLED.
    """

    tileProgress = pyqtSignal(object)  # noqa: N815 - Qt signal naming; carries a TileProgress

    def __init__(
        self,
        description: str,
        work: Callable[[LookalikeTask], Any],
        on_finished: Optional[Callable[[LookalikeTask], None]] = None,
        can_cancel: bool = True,
    ) -> None:
        flags = QgsTask.Flag.CanCancel if can_cancel else QgsTask.Flag(0)
        super().__init__(description, flags)
        self.work = work
        self.on_finished = on_finished
        self.outcome: Optional[TaskOutcome] = None
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.error_details = ""
        self.started_at = 0.0
        self.elapsed_s = 0.0

    def run(self) -> bool:
        self.started_at = time.monotonic()
        try:
            self.result = self.work(self)
        except CancelledError as error:
            self.outcome = TaskOutcome.CANCELLED
            self.error = error
        except LookalikeError as error:
            self.outcome = TaskOutcome.FAILED
            self.error = error
            self.error_details = traceback.format_exc()
        except Exception as error:  # noqa: BLE001 - task boundary: every failure must reach finished()
            self.outcome = TaskOutcome.FAILED
            self.error = error
            self.error_details = traceback.format_exc()
        else:
            self.outcome = TaskOutcome.CANCELLED if self.isCanceled() else TaskOutcome.SUCCEEDED
        self.elapsed_s = time.monotonic() - self.started_at
        if self.outcome is TaskOutcome.FAILED:
            if isinstance(self.error, LookalikeError):
                # The analyst fixes such an input from the message alone, so no traceback is logged.
                LOGGER.warning("%s failed: %s", self.description(), self.error)
                LOGGER.debug("%s", self.error_details)
            else:
                LOGGER.error("%s failed: %s\n%s", self.description(), self.error, self.error_details)
        return self.outcome is TaskOutcome.SUCCEEDED

    def finished(self, result: bool) -> None:
        # A task cancelled before it started never ran run(), so it has no outcome yet.
        if self.outcome is None:
            self.outcome = TaskOutcome.CANCELLED
        if self.on_finished is not None:
            self.on_finished(self)

    def report_progress(self, progress: TileProgress) -> None:
        """Publish progress from the worker thread to the task manager and to listeners."""
        self.setProgress(progress.percent)
        self.tileProgress.emit(progress)

    def check_cancelled(self) -> None:
        """Raise CancelledError when the user cancelled the task; called between batches."""
        if self.isCanceled():
            raise CancelledError(f"{self.description()} was cancelled.")
