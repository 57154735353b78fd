"""The query an analyst is working on, stored in the QGIS project so that reopening it continues the query.

A project keeps its result layers (empty memory layers, filled again from the index), but the
drawn query parts, the relevance marks and which layer the dock's table shows live in the dock.
They are written under the ``lookalike`` scope as one JSON entry. Marks are tile ids of one
build of an index, so they carry that build's identity and are only restored with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from qgis.core import QgsProject

from ..core import get_logger
from .project_state import SCOPE
from .results import Relevance

LOGGER = get_logger("ui.query_session")

SESSION_KEY = "/query_session"
SESSION_FORMAT_VERSION = 1


@dataclass
class QuerySession:
    """The dock's query: its number, parts ``(wkt, negative, crs_wkt)``, table layer and marks.

    ``results_index`` is the ``(folder, index id)`` of the build the table's matches and the
    marks came from, or None when the table is empty. ``emptied_by_removal`` is True when
    Remove last part took the query's last part, so that the next drawing continues this query.
    """

    query_number: int = 0
    parts: list[tuple[str, bool, str]] = field(default_factory=list)
    result_layer_id: str = ""
    results_index: Optional[tuple[str, str]] = None
    marks: dict[int, Relevance] = field(default_factory=dict)
    emptied_by_removal: bool = False


def write_session(session: QuerySession, project: QgsProject) -> None:
    record = {
        "version": SESSION_FORMAT_VERSION,
        "query_number": session.query_number,
        "parts": [[wkt, negative, crs_wkt] for wkt, negative, crs_wkt in session.parts],
        "result_layer_id": session.result_layer_id,
        "results_index": list(session.results_index) if session.results_index else None,
        "marks": [[tile_id, relevance.value] for tile_id, relevance in session.marks.items()],
        "emptied_by_removal": session.emptied_by_removal,
    }
    project.writeEntry(SCOPE, SESSION_KEY, json.dumps(record))


def read_session(project: QgsProject, problems: Optional[list[str]] = None) -> Optional[QuerySession]:
    """Return the stored query, or None when the project has none or an entry the dock cannot use.

    Why an entry cannot be used is appended to ``problems``.
    """
    text, found = project.readEntry(SCOPE, SESSION_KEY, "")
    if not found or not text:
        return None
    try:
        record = json.loads(text)
        if record.get("version") != SESSION_FORMAT_VERSION:
            raise ValueError(f"format version {record.get('version')!r}, expected {SESSION_FORMAT_VERSION}")
        results_index = record.get("results_index")
        session = QuerySession(
            query_number=_whole_number(record.get("query_number", 0)),
            parts=[(str(wkt), _flag(negative), str(crs_wkt)) for wkt, negative, crs_wkt in record.get("parts", [])],
            result_layer_id=str(record.get("result_layer_id") or ""),
            results_index=(str(results_index[0]), str(results_index[1])) if results_index else None,
            marks={_whole_number(tile_id): Relevance(value) for tile_id, value in record.get("marks", [])},
            # Projects saved before this entry existed lack it.
            emptied_by_removal=_flag(record.get("emptied_by_removal", False)),
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        # A project edited by hand, or written by a later version: the rest of the project still opens.
        LOGGER.warning("The project's Lookalike query cannot be restored (%s); draw the query again", error)
        if problems is not None:
            problems.append(str(error))
        return None
    return session


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _whole_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    return value
