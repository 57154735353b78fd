"""The results table sorted by its column headers: rows move, tiles keep their marks and thumbnails."""

from dataclasses import dataclass

from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtGui import QColor, QImage
from qgis.PyQt.QtTest import QTest

from lookalike.ui.results import RELEVANCE_LABELS, Relevance, ResultsTable


@dataclass
class FakeMatch:
    tile_id: int
    rank: int
    score: float
    row: int = 0
    col: int = 0
    source_path: str = "scene.tif"


# Ranks follow the scores, as a search returns them; one score is negative.
MATCHES = [FakeMatch(40, 1, 0.95), FakeMatch(7, 2, 0.5), FakeMatch(12, 3, 0.12), FakeMatch(3, 4, -0.3)]


def shown_tile_ids(table: ResultsTable) -> list:
    return [table.item(row, table.COLUMN_THUMBNAIL).data(Qt.ItemDataRole.UserRole) for row in range(table.rowCount())]


def click_header(table: ResultsTable, column: int) -> None:
    header = table.horizontalHeader()
    position = QPoint(header.sectionViewportPosition(column) + header.sectionSize(column) // 2, header.height() // 2)
    QTest.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=position)


def make_table(qgis_app) -> ResultsTable:
    table = ResultsTable()
    table.resize(400, 400)
    table.show()
    table.set_matches(MATCHES)
    return table


def test_header_click_sorts_scores_as_numbers(qgis_app):
    table = make_table(qgis_app)
    click_header(table, table.COLUMN_RELEVANCE)
    assert shown_tile_ids(table) == [40, 7, 12, 3]

    click_header(table, table.COLUMN_SCORE)
    first_order = shown_tile_ids(table)
    click_header(table, table.COLUMN_SCORE)
    second_order = shown_tile_ids(table)

    # The first click lists the best match first, as Rank does; the negative score sorts as a number.
    assert first_order == [40, 7, 12, 3]
    assert second_order == [3, 12, 7, 40]
    assert table.tile_ids() == [40, 7, 12, 3]


def test_sorted_rows_keep_marks_and_clicks(qgis_app):
    table = make_table(qgis_app)
    # Descending by the sort key: the lowest score first.
    table.sortByColumn(table.COLUMN_SCORE, Qt.SortOrder.DescendingOrder)
    activated = []
    table.matchActivated.connect(activated.append)

    table.set_relevance(7, Relevance.RELEVANT)
    table.set_relevance(3, Relevance.NOT_RELEVANT)
    image = QImage(8, 8, QImage.Format.Format_RGB32)
    image.fill(QColor("red"))
    table.set_thumbnail(12, image)
    table.cellClicked.emit(0, table.COLUMN_RANK)

    assert activated == [3]
    rows = {tile_id: row for row, tile_id in enumerate(shown_tile_ids(table))}
    assert table.item(rows[7], table.COLUMN_RELEVANCE).text() == RELEVANCE_LABELS[Relevance.RELEVANT]
    assert table.item(rows[3], table.COLUMN_RELEVANCE).text() == RELEVANCE_LABELS[Relevance.NOT_RELEVANT]
    assert table.item(rows[40], table.COLUMN_RELEVANCE).text() == RELEVANCE_LABELS[Relevance.UNMARKED]
    assert table.has_thumbnail(12)
    assert not table.has_thumbnail(40)
    assert not table.item(rows[12], table.COLUMN_THUMBNAIL).icon().isNull()

    assert table.apply_score_threshold(0.4) == 2
    hidden = [tile_id for row, tile_id in enumerate(shown_tile_ids(table)) if table.isRowHidden(row)]
    assert sorted(hidden) == [3, 12]


def test_mark_sort_survives_new_search(qgis_app):
    table = make_table(qgis_app)
    table.set_relevance(12, Relevance.RELEVANT)
    table.set_relevance(40, Relevance.NOT_RELEVANT)
    table.sortByColumn(table.COLUMN_RELEVANCE, Qt.SortOrder.AscendingOrder)

    order = shown_tile_ids(table)
    assert (order[0], order[-1]) == (12, 40)
    # A mark changed while sorted by mark moves its row, and the row still shows the tile's mark.
    table.set_relevance(7, Relevance.RELEVANT)
    order = shown_tile_ids(table)
    assert set(order[:2]) == {7, 12}
    assert table.item(order.index(7), table.COLUMN_RELEVANCE).text() == RELEVANCE_LABELS[Relevance.RELEVANT]
    assert table.selected_tile_ids() == []

    table.set_matches([FakeMatch(3, 1, 0.9), FakeMatch(40, 2, 0.8), FakeMatch(12, 3, 0.7)])
    order = shown_tile_ids(table)
    assert (order[0], order[-1]) == (12, 40)


def test_cleared_marks_return_to_rank_order(qgis_app):
    table = ResultsTable()
    table.set_matches([FakeMatch(100 + rank, rank, 1.0 - rank / 10) for rank in range(1, 9)])
    table.sortByColumn(table.COLUMN_RELEVANCE, Qt.SortOrder.AscendingOrder)

    table.set_relevance(106, Relevance.RELEVANT)
    table.set_relevance(103, Relevance.NOT_RELEVANT)
    assert shown_tile_ids(table) == [106, 101, 102, 104, 105, 107, 108, 103]
    table.set_relevances([106, 103], Relevance.UNMARKED)

    assert shown_tile_ids(table) == [101, 102, 103, 104, 105, 106, 107, 108]


def test_marking_many_rows_sorted_by_mark(qgis_app):
    table = ResultsTable()
    table.set_matches([FakeMatch(tile_id, tile_id + 1, 1.0 - tile_id / 1000) for tile_id in range(500)])
    table.sortByColumn(table.COLUMN_RELEVANCE, Qt.SortOrder.AscendingOrder)
    changed = []
    table.relevanceChanged.connect(lambda tile_id, relevance: changed.append(tile_id))

    table.set_relevances(range(250, 500, 2), Relevance.RELEVANT)

    assert changed == list(range(250, 500, 2))
    order = shown_tile_ids(table)
    assert order[:125] == list(range(250, 500, 2))
    for row, tile_id in enumerate(order):
        expected = Relevance.RELEVANT if tile_id >= 250 and tile_id % 2 == 0 else Relevance.UNMARKED
        assert table.item(row, table.COLUMN_RELEVANCE).text() == RELEVANCE_LABELS[expected]
