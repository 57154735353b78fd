"""Results views: the table of matches with thumbnails and relevance marks, and the score histogram."""

from __future__ import annotations

import contextlib
import enum
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from qgis.PyQt.QtCore import QRectF, QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QIcon, QImage, QPainter, QPen, QPixmap
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

THUMBNAIL_SIZE_PX = 64


class Relevance(enum.Enum):
    UNMARKED = ""
    RELEVANT = "relevant"
    NOT_RELEVANT = "not relevant"


RELEVANCE_LABELS = {
    Relevance.UNMARKED: "–",
    Relevance.RELEVANT: "✔ relevant",
    Relevance.NOT_RELEVANT: "✘ not relevant",
}
RELEVANCE_COLORS = {
    Relevance.RELEVANT: QColor(200, 240, 205),
    Relevance.NOT_RELEVANT: QColor(250, 210, 210),
}


# The first click on Mark lists relevant tiles first, then unmarked, then not relevant, each group
# in rank order.
RELEVANCE_SORT_KEYS = {Relevance.RELEVANT: 0, Relevance.UNMARKED: 1, Relevance.NOT_RELEVANT: 2}


class _SortKeyItem(QTableWidgetItem):
    """A cell that shows text and sorts by ``sort_key``, such as a mark and then the rank."""

    def __init__(self, text: str, sort_key: object) -> None:
        super().__init__(text)
        self.sort_key = sort_key

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _SortKeyItem):
            return self.sort_key < other.sort_key
        return super().__lt__(other)


class ResultsTable(QTableWidget):
    """One row per match: thumbnail, rank, score and the analyst's relevance mark.

    Rows are keyed by tile id. ``matchActivated`` carries the tile id of a clicked row. Marks
    cycle with a double click on the mark cell or are set with :meth:`set_relevance`. Marks
    outlive the rows: a marked tile that a new search no longer returns keeps its mark, so it
    still steers the next search, until :meth:`clear_marks`. A click on a column header sorts
    the rows by rank, score or mark, best first (a second click reverses the order), and a new
    search keeps the chosen order.
    """

    COLUMN_THUMBNAIL = 0
    COLUMN_RANK = 1
    COLUMN_SCORE = 2
    COLUMN_RELEVANCE = 3

    matchActivated = pyqtSignal(int)  # noqa: N815 - Qt signal naming
    relevanceChanged = pyqtSignal(int, object)  # noqa: N815 - tile id, Relevance

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(0, 4, parent)
        self.setObjectName("lookalikeResultsTable")
        self.setHorizontalHeaderLabels(["", "Rank", "Score", "Mark"])
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setIconSize(QSize(THUMBNAIL_SIZE_PX, THUMBNAIL_SIZE_PX))
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(THUMBNAIL_SIZE_PX + 4)
        header = self.horizontalHeader()
        header.setSectionResizeMode(self.COLUMN_THUMBNAIL, QHeaderView.ResizeMode.Fixed)
        self.setColumnWidth(self.COLUMN_THUMBNAIL, THUMBNAIL_SIZE_PX + 8)
        header.setSectionResizeMode(self.COLUMN_RELEVANCE, QHeaderView.ResizeMode.Stretch)
        self.setMinimumHeight(260)
        # Sorting moves rows, so each tile is found through its thumbnail item, not a row number.
        self._item_of_tile: Dict[int, QTableWidgetItem] = {}
        self._relevance: Dict[int, Relevance] = {}
        self._scores: Dict[int, float] = {}
        self._ranks: Dict[int, int] = {}
        self.cellClicked.connect(self._on_cell_clicked)
        self.cellDoubleClicked.connect(self._on_cell_double_clicked)
        self.setSortingEnabled(True)
        self.sortByColumn(self.COLUMN_RANK, Qt.SortOrder.AscendingOrder)

    def set_matches(self, matches: Sequence) -> None:
        """Fill the table from ``core.search.Match`` objects, showing the marks made so far."""
        # Qt would sort the table after every item set while the rows are filled.
        with self._sorting_paused():
            self._fill_rows(matches)

    def _fill_rows(self, matches: Sequence) -> None:
        self.setRowCount(0)
        self._item_of_tile = {}
        self._scores = {}
        self._ranks = {int(match.tile_id): int(match.rank) for match in matches}
        self.setRowCount(len(matches))
        for row, match in enumerate(matches):
            tile_id = int(match.tile_id)
            self._scores[tile_id] = float(match.score)
            thumbnail = QTableWidgetItem()
            thumbnail.setData(Qt.ItemDataRole.UserRole, tile_id)
            thumbnail.setToolTip(f"Tile {tile_id} (row {match.row}, col {match.col}) of {match.source_path}")
            self.setItem(row, self.COLUMN_THUMBNAIL, thumbnail)
            self._item_of_tile[tile_id] = thumbnail
            rank = QTableWidgetItem()
            rank.setData(Qt.ItemDataRole.DisplayRole, int(match.rank))
            self.setItem(row, self.COLUMN_RANK, rank)
            # Sorted by the negated score, so that the first click on Score lists the best match
            # first, as the first click on Rank does.
            self.setItem(row, self.COLUMN_SCORE, _SortKeyItem(f"{match.score:.3f}", -float(match.score)))
            self.setItem(row, self.COLUMN_RELEVANCE, _SortKeyItem("", (0, 0)))
            self._show_relevance(tile_id, self.relevance(tile_id), row)

    def remove_tiles(self, tile_ids: Iterable[int]) -> None:
        """Remove the rows of ``tile_ids``; their marks stay."""
        tile_ids = set(tile_ids)
        rows = self._rows_by_tile()
        for tile_id in tile_ids:
            self._item_of_tile.pop(tile_id, None)
            self._scores.pop(tile_id, None)
            self._ranks.pop(tile_id, None)
        # From the bottom up, so that the rows still to remove keep their numbers.
        for row in sorted((rows[tile_id] for tile_id in tile_ids if tile_id in rows), reverse=True):
            self.removeRow(row)

    def tile_ids(self) -> List[int]:
        """Return the listed tiles in rank order, whatever order the rows are sorted in."""
        return list(self._item_of_tile)

    def _row(self, tile_id: int) -> Optional[int]:
        item = self._item_of_tile.get(tile_id)
        return None if item is None else self.row(item)

    def _rows_by_tile(self) -> Dict[int, int]:
        """Return the row of every listed tile, for changes to many rows while sorting is paused.

        Once rows were sorted, Qt finds an item's row by a search through every cell, which made
        marking 10,000 rows take a second.
        """
        return {self.item(row, self.COLUMN_THUMBNAIL).data(Qt.ItemDataRole.UserRole): row
                for row in range(self.rowCount())}

    def set_thumbnail(self, tile_id: int, image: QImage) -> None:
        row = self._row(tile_id)
        if row is None or image.isNull():
            return
        pixmap = QPixmap.fromImage(image).scaled(
            THUMBNAIL_SIZE_PX,
            THUMBNAIL_SIZE_PX,
            Qt.AspectRatioMode.KeepAspectRatio,
            Qt.TransformationMode.SmoothTransformation,
        )
        self.item(row, self.COLUMN_THUMBNAIL).setIcon(QIcon(pixmap))

    def has_thumbnail(self, tile_id: int) -> bool:
        item = self._item_of_tile.get(tile_id)
        return item is not None and not item.icon().isNull()

    def relevance(self, tile_id: int) -> Relevance:
        return self._relevance.get(tile_id, Relevance.UNMARKED)

    def tiles_marked(self, relevance: Relevance) -> List[int]:
        return [tile_id for tile_id, mark in self._relevance.items() if mark is relevance]

    def set_relevance(self, tile_id: int, relevance: Relevance) -> None:
        self.set_relevances([tile_id], relevance)

    def set_relevances(self, tile_ids: Iterable[int], relevance: Relevance) -> None:
        """Mark the tiles of ``tile_ids`` that have a row, and leave the others alone."""
        listed = [tile_id for tile_id in tile_ids if tile_id in self._item_of_tile]
        with self._sorting_paused():
            rows = self._rows_by_tile()
            for tile_id in listed:
                self._show_relevance(tile_id, relevance, rows[tile_id])
        for tile_id in listed:
            self.relevanceChanged.emit(tile_id, relevance)

    @contextlib.contextmanager
    def _sorting_paused(self) -> Iterator[None]:
        """Keep rows in place while cells change, then sort once.

        With sorting on, Qt sorts a row again after each change of one of its cells: marking
        10,000 rows took 2 to 6 s instead of 0.14 s.
        """
        was_sorting = self.isSortingEnabled()
        self.setSortingEnabled(False)
        try:
            yield
        finally:
            self.setSortingEnabled(was_sorting)

    def marks(self) -> Dict[int, Relevance]:
        """Return every mark made since :meth:`clear_marks`, also of tiles no longer listed."""
        return dict(self._relevance)

    def restore_marks(self, marks: Dict[int, Relevance]) -> None:
        """Replace the marks with ``marks`` (from a saved project), showing those of listed tiles."""
        self.clear_marks()
        with self._sorting_paused():
            rows = self._rows_by_tile()
            for tile_id, relevance in marks.items():
                if relevance is Relevance.UNMARKED:
                    continue
                if tile_id in rows:
                    self._show_relevance(tile_id, relevance, rows[tile_id])
                else:
                    self._relevance[tile_id] = relevance

    def clear_marks(self) -> None:
        with self._sorting_paused():
            rows = self._rows_by_tile()
            for tile_id in list(self._relevance):
                if tile_id in rows:
                    self._show_relevance(tile_id, Relevance.UNMARKED, rows[tile_id])
        self._relevance = {}

    def selected_tile_ids(self) -> List[int]:
        rows = sorted({index.row() for index in self.selectedIndexes()})
        return [self.item(row, self.COLUMN_THUMBNAIL).data(Qt.ItemDataRole.UserRole) for row in rows]

    def apply_score_threshold(self, min_score: float) -> int:
        """Hide the rows scoring below ``min_score`` and return how many stay visible."""
        visible = 0
        for tile_id, row in self._rows_by_tile().items():
            hidden = self._scores[tile_id] < min_score
            self.setRowHidden(row, hidden)
            visible += not hidden
        return visible

    def _show_relevance(self, tile_id: int, relevance: Relevance, row: int) -> None:
        """Show the mark in the tile's ``row``, which stays in place because callers pause sorting."""
        if relevance is Relevance.UNMARKED:
            self._relevance.pop(tile_id, None)
        else:
            self._relevance[tile_id] = relevance
        color = RELEVANCE_COLORS.get(relevance)
        for column in range(self.columnCount()):
            cell = self.item(row, column)
            if color is None:
                cell.setData(Qt.ItemDataRole.BackgroundRole, None)
            else:
                cell.setBackground(color)
        item = self.item(row, self.COLUMN_RELEVANCE)
        item.setToolTip("Double-click to cycle: relevant, not relevant, unmarked")
        item.sort_key = (RELEVANCE_SORT_KEYS[relevance], self._ranks.get(tile_id, 0))
        item.setText(RELEVANCE_LABELS[relevance])

    def _on_cell_clicked(self, row: int, _column: int) -> None:
        self.matchActivated.emit(self.item(row, self.COLUMN_THUMBNAIL).data(Qt.ItemDataRole.UserRole))

    def _on_cell_double_clicked(self, row: int, column: int) -> None:
        if column != self.COLUMN_RELEVANCE:
            return
        tile_id = self.item(row, self.COLUMN_THUMBNAIL).data(Qt.ItemDataRole.UserRole)
        cycle = [Relevance.UNMARKED, Relevance.RELEVANT, Relevance.NOT_RELEVANT]
        current = cycle.index(self.relevance(tile_id))
        self.set_relevance(tile_id, cycle[(current + 1) % len(cycle)])


class ScoreHistogram(QWidget):
    """Bar chart of match scores with the score threshold drawn as a vertical line."""

    BIN_COUNT = 20

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("lookalikeScoreHistogram")
        self.setMinimumHeight(60)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._scores: List[float] = []
        self._threshold: Optional[float] = None

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(240, 70)

    def set_scores(self, scores: Sequence[float]) -> None:
        self._scores = [float(score) for score in scores]
        self.update()

    def set_threshold(self, threshold: Optional[float]) -> None:
        self._threshold = threshold
        self.update()

    def score_range(self) -> tuple[float, float]:
        if not self._scores:
            return 0.0, 1.0
        low, high = min(self._scores), max(self._scores)
        if high - low < 1e-6:
            return low - 0.05, high + 0.05
        return low, high

    def bin_counts(self) -> List[int]:
        counts = [0] * self.BIN_COUNT
        low, high = self.score_range()
        for score in self._scores:
            position = int((score - low) / (high - low) * self.BIN_COUNT)
            counts[min(max(position, 0), self.BIN_COUNT - 1)] += 1
        return counts

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt override
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        area = QRectF(self.rect()).adjusted(4, 4, -4, -14)
        painter.fillRect(self.rect(), self.palette().base())
        if not self._scores:
            painter.drawText(area, int(Qt.AlignmentFlag.AlignCenter), "No scores yet")
            painter.end()
            return

        counts = self.bin_counts()
        tallest = max(counts) or 1
        bar_width = area.width() / self.BIN_COUNT
        low, high = self.score_range()
        for index, count in enumerate(counts):
            if count == 0:
                continue
            bar_height = area.height() * count / tallest
            bin_low = low + (high - low) * index / self.BIN_COUNT
            below = self._threshold is not None and bin_low + (high - low) / self.BIN_COUNT <= self._threshold
            color = QColor(170, 170, 170) if below else QColor(230, 60, 60)
            painter.fillRect(
                QRectF(area.left() + index * bar_width, area.bottom() - bar_height, bar_width - 1, bar_height),
                color,
            )

        painter.setPen(self.palette().text().color())
        painter.drawText(QRectF(area.left(), area.bottom(), area.width(), 14),
                         int(Qt.AlignmentFlag.AlignLeft), f"{low:.2f}")
        painter.drawText(QRectF(area.left(), area.bottom(), area.width(), 14),
                         int(Qt.AlignmentFlag.AlignRight), f"{high:.2f}")
        if self._threshold is not None and low <= self._threshold <= high:
            x = area.left() + area.width() * (self._threshold - low) / (high - low)
            painter.setPen(QPen(QColor(0, 90, 200), 2))
            painter.drawLine(int(x), int(area.top()), int(x), int(area.bottom()))
        painter.end()
