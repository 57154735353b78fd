"""The search group of the Lookalike dock: query drawing tools, query geometries and running a search."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsVectorLayer,
)
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
)

from ..core import get_logger
from ..core.errors import LookalikeError
from ..core.index import MANIFEST_NAME, read_manifest_json
from ..gis import matches as match_layers
from ..gis.raster_layers import crs_to_wkt
from ..gis.tasks import LookalikeTask, TaskOutcome
from . import jobs
from .build_panel import read_manifest_stamp
from .compat import POINT_GEOMETRY, POLYGON_GEOMETRY, VECTOR_LAYER_FILTER
from .dock_constants import DEFAULT_K, THRESHOLD_STEPS
from .query_session import QuerySession
from .result_layer import apply_score_threshold, remember_matches, stored_matches, stored_min_score, style_result_layer
from .results import Relevance

LOGGER = get_logger("ui.search_panel")


class SearchPanelMixin:
    """Widgets and slots of the "Search" group, mixed into ``LookalikeDockWidget``."""

    def _build_search_group(self) -> QGroupBox:
        # The index the shown matches and their relevance marks belong to.
        self._results_index_identity: Optional[tuple] = None
        # Marks made on indexes that another index replaced, by index identity, brought back when
        # that index opens again. Clearing the query drops them, because they belong to it.
        self._marks_set_aside: Dict[tuple, Dict[int, Relevance]] = {}
        group = QGroupBox("2 · Search")
        layout = QVBoxLayout(group)
        tools_row = QHBoxLayout()
        self.tool_buttons: Dict[str, QToolButton] = {}
        for name, label, tip in (
            ("rectangle", "Rectangle", "Drag a rectangle around the object to look for"),
            ("polygon", "Polygon", "Click vertices; right-click or double-click to close the polygon"),
            ("point", "Point", "Click a point; the tile centred on it is the query"),
        ):
            button = QToolButton()
            button.setObjectName(f"lookalikeTool_{name}")
            action = self._checkable_action(label, tip)
            action.triggered.connect(lambda checked, tool=name: self.activate_tool(tool) if checked else None)
            button.setDefaultAction(action)
            tools_row.addWidget(button)
            self.tool_buttons[name] = button
        self.negative_button = QToolButton()
        self.negative_button.setObjectName("lookalikeNegative")
        self.negative_button.setCheckable(True)
        self.negative_button.setText("Negative")
        self.negative_button.setToolTip(
            "Add what you draw as a negative example (not like this); holding Shift does the same"
        )
        self.negative_button.toggled.connect(self._on_negative_toggled)
        tools_row.addWidget(self.negative_button)
        tools_row.addStretch(1)
        layout.addLayout(tools_row)

        selected_row = QHBoxLayout()
        self.query_layer_combo = QgsMapLayerComboBox()
        self.query_layer_combo.setObjectName("lookalikeQueryLayer")
        self.query_layer_combo.setFilters(VECTOR_LAYER_FILTER)
        self.use_selected_button = QPushButton("Use selected features")
        self.use_selected_button.setObjectName("lookalikeUseSelected")
        self.use_selected_button.clicked.connect(self.add_selected_features)
        selected_row.addWidget(self.query_layer_combo, 1)
        selected_row.addWidget(self.use_selected_button)
        layout.addLayout(selected_row)

        run_row = QHBoxLayout()
        run_row.addWidget(QLabel("Matches (k)"))
        self.k_spin = QSpinBox()
        self.k_spin.setObjectName("lookalikeK")
        self.k_spin.setRange(1, 10000)
        self.k_spin.setValue(DEFAULT_K)
        run_row.addWidget(self.k_spin)
        self.search_button = QPushButton("Search")
        self.search_button.setObjectName("lookalikeSearch")
        self.search_button.setToolTip("Search again with the drawn query and the relevance marks")
        self.search_button.clicked.connect(self._on_search_button_clicked)
        run_row.addWidget(self.search_button)
        layout.addLayout(run_row)
        # Editing the query has its own row, which keeps the panel narrow enough to dock at a side.
        edit_row = QHBoxLayout()
        # A click removes the last part; the arrow lists every part, to remove another one.
        self.remove_part_button = QToolButton()
        self.remove_part_button.setText("Remove last part")
        self.remove_part_button.setObjectName("lookalikeRemoveLastPart")
        self.remove_part_button.setToolTip(
            "Remove the part added last, positive or negative, and search again; the arrow lists every part"
        )
        self.remove_part_button.setPopupMode(QToolButton.ToolButtonPopupMode.MenuButtonPopup)
        self.remove_part_button.clicked.connect(self.remove_last_query_part)
        self.query_parts_menu = QMenu(self.remove_part_button)
        self.query_parts_menu.setObjectName("lookalikeQueryPartsMenu")
        self.query_parts_menu.aboutToShow.connect(self._fill_query_parts_menu)
        self.remove_part_button.setMenu(self.query_parts_menu)
        edit_row.addWidget(self.remove_part_button)
        self.clear_query_button = QPushButton("Clear query")
        self.clear_query_button.setObjectName("lookalikeClearQuery")
        self.clear_query_button.setToolTip("Remove every part and the relevance marks, to start a new query")
        self.clear_query_button.clicked.connect(self.clear_query)
        edit_row.addWidget(self.clear_query_button)
        # Enabled once there is a part or mark to remove (see _update_query_label).
        self.remove_part_button.setEnabled(False)
        self.clear_query_button.setEnabled(False)
        edit_row.addStretch(1)
        layout.addLayout(edit_row)
        self.query_label = QLabel("Draw on the map to search.")
        self.query_label.setObjectName("lookalikeQueryStatus")
        self.query_label.setWordWrap(True)
        layout.addWidget(self.query_label)
        return group

    # -- query ---------------------------------------------------------------------------------

    def activate_tool(self, name: str) -> None:
        tool = self.map_tools[name]
        tool.set_negative_mode(self.negative_button.isChecked())
        self.canvas.setMapTool(tool)

    def _on_map_tool_set(self, new_tool, _old_tool=None) -> None:
        for name, tool in self.map_tools.items():
            self.tool_buttons[name].defaultAction().setChecked(tool is new_tool)

    def _on_negative_toggled(self, negative: bool) -> None:
        for tool in self.map_tools.values():
            tool.set_negative_mode(negative)

    def add_query_geometry(self, geometry: QgsGeometry, negative: bool) -> None:
        """Add a drawn part (canvas CRS) to the query and search again."""
        if not self._can_take_query_parts("drawing"):
            return
        crs_wkt = crs_to_wkt(self.canvas.mapSettings().destinationCrs())
        self._add_query_part(geometry, negative, crs_wkt)
        self.start_search()

    def _can_take_query_parts(self, what: str) -> bool:
        """Return whether a new query part can be added; when it cannot, show why in the message bar."""
        if self.index is not None or self.build_task is not None:
            return True
        # A part kept now would join the first query of the index built or opened later, unseen.
        if self._index_opening:
            text = (f"The index is still opening, so the {what} was not kept; add it again when the status line "
                    "says 'Index open'.")
        else:
            text = (f"No index is open, so the {what} was not kept; build an index or choose an index folder, "
                    "then add the query.")
        self.push_message(text, Qgis.MessageLevel.Warning)
        return False

    def _add_query_part(self, geometry: QgsGeometry, negative: bool, crs_wkt: str) -> None:
        if not self.query_parts and not self._query_emptied_by_removal:
            self._next_query_number()
        self._query_emptied_by_removal = False
        self.query_parts.append((QgsGeometry(geometry), negative, crs_wkt))
        self._show_query_part(geometry, negative, crs_wkt)
        self._update_query_label()

    def _next_query_number(self) -> None:
        self._query_number_before_new = self.query_number
        self.query_number += 1
        # A project saved with results brings their layers back (empty, as memory layers are
        # not saved), so a new query takes a name no layer of the project has.
        while self.project.mapLayersByName(self.query_layer_name()):
            self.query_number += 1

    def _show_query_part(self, geometry: QgsGeometry, negative: bool, crs_wkt: str) -> None:
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        if crs_wkt and crs_wkt != crs_to_wkt(canvas_crs):
            # A part restored from a project whose map has since changed CRS.
            geometry = QgsGeometry(geometry)
            geometry.transform(QgsCoordinateTransform(QgsCoordinateReferenceSystem.fromWkt(crs_wkt), canvas_crs,
                                                      self.project))
        self.overlay.add(geometry, negative)

    def restore_query(self, session: QuerySession) -> None:
        """Bring back the query parts and query number of a saved project; marks wait for the index."""
        self.query_parts = []
        self.overlay.clear()
        self.query_number = max(self.query_number, session.query_number)
        left_out = 0
        for wkt, negative, crs_wkt in session.parts:
            geometry = QgsGeometry.fromWkt(wkt)
            if geometry.isNull() or geometry.isEmpty() or not QgsCoordinateReferenceSystem.fromWkt(crs_wkt).isValid():
                LOGGER.warning("A saved query part without a valid geometry or CRS was left out: %.80s", wkt)
                left_out += 1
                continue
            self.query_parts.append((geometry, negative, crs_wkt))
            self._show_query_part(geometry, negative, crs_wkt)
        if left_out:
            self.push_message(
                f"{left_out} query part(s) saved with this project have no valid geometry or CRS and were left "
                "out; draw them again.",
                Qgis.MessageLevel.Warning,
            )
        self._query_emptied_by_removal = session.emptied_by_removal and not self.query_parts
        self._update_query_label()

    def query_session(self) -> QuerySession:
        """Return the query as it is now, to be saved with the project."""
        return QuerySession(
            query_number=self.query_number,
            parts=[(geometry.asWkt(), negative, crs_wkt) for geometry, negative, crs_wkt in self.query_parts],
            result_layer_id=self.result_layer_id,
            results_index=self._results_index_identity,
            marks=self.results_table.marks(),
            emptied_by_removal=self._query_emptied_by_removal,
        )

    def add_selected_features(self) -> None:
        if not self._can_take_query_parts("selection"):
            return
        layer = self.query_layer_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer) or layer.selectedFeatureCount() == 0:
            self.push_message(
                "No features are selected in the query layer; select the examples to search with.",
                Qgis.MessageLevel.Warning,
            )
            return
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        transform = QgsCoordinateTransform(layer.crs(), canvas_crs, self.project)
        negative = self.negative_button.isChecked()
        added = 0
        lines = 0
        for feature in layer.getFeatures(QgsFeatureRequest().setFilterFids(layer.selectedFeatureIds())):
            if not feature.hasGeometry():
                continue
            if feature.geometry().type() not in (POLYGON_GEOMETRY, POINT_GEOMETRY):
                lines += 1
                continue
            geometry = QgsGeometry(feature.geometry())
            geometry.transform(transform)
            self._add_query_part(geometry, negative, crs_to_wkt(canvas_crs))
            added += 1
        if lines:
            self.push_message(
                f"{lines} selected feature(s) of {layer.name()} are lines, which cannot be a query; "
                "select polygons or points.",
                Qgis.MessageLevel.Warning,
            )
        if added:
            self.start_search()

    def clear_query(self) -> None:
        """Remove the drawn parts and the relevance marks; the next drawing starts a new query.

        A search still running belongs to the cleared query, so it is cancelled and shows nothing.
        """
        if self.search_task is not None:
            self._search_again = False
            self.search_task.cancel()
        self.query_parts = []
        self._query_emptied_by_removal = False
        self.overlay.clear()
        self.results_table.clear_marks()
        self._marks_set_aside.clear()
        self._update_query_label()

    def _fill_query_parts_menu(self) -> None:
        """List a Remove action per query part, counting positives and negatives apart as the search's warnings do."""
        self.query_parts_menu.clear()
        counts = {False: 0, True: 0}
        for position, (_geometry, negative, _crs) in enumerate(self.query_parts):
            counts[negative] += 1
            kind = "negative" if negative else "positive"
            action = self.query_parts_menu.addAction(f"Remove part {position + 1}: {kind} example {counts[negative]}")
            action.hovered.connect(lambda index=position: self._flash_query_part(index))
            action.triggered.connect(lambda _checked=False, index=position: self.remove_query_part(index))

    def _flash_query_part(self, position: int) -> None:
        if 0 <= position < len(self.query_parts):
            geometry, _negative, crs_wkt = self.query_parts[position]
            self.canvas.flashGeometries([geometry], QgsCoordinateReferenceSystem.fromWkt(crs_wkt))

    def remove_last_query_part(self) -> None:
        """Remove the part added last and search again with the rest; the query and its marks stay."""
        if not self.query_parts:
            self.push_message("The query has no part to remove; draw one on the map.", Qgis.MessageLevel.Info)
            return
        self.remove_query_part(len(self.query_parts) - 1)

    def remove_query_part(self, position: int) -> None:
        """Remove the part at ``position`` and search again with the rest; the query and its marks stay.

        Without a positive part or a relevant mark left there is nothing to search for, so the
        matches shown stay those of the query before, and the message bar explains that.
        """
        if not 0 <= position < len(self.query_parts):
            return
        if self.search_task is not None:
            # The running search may include the removed part, so its matches must not be shown.
            self._search_again = False
            self.search_task.cancel()
        self._remove_query_part(position)
        self._query_emptied_by_removal = not self.query_parts
        self._update_query_label()
        self._store_state()
        has_positive = any(not negative for _geometry, negative, _crs in self.query_parts)
        if has_positive or self.results_table.tiles_marked(Relevance.RELEVANT):
            self.start_search()
            return
        self.push_message(
            "No positive part or relevant mark is left, so no search ran and the matches shown are those of the "
            "query before; draw a positive part to search again, or click Clear query to start a new query.",
            Qgis.MessageLevel.Info,
        )

    def _remove_query_part(self, position: int) -> None:
        del self.query_parts[position]
        self.redraw_query_parts()
        self._update_query_label()

    def redraw_query_parts(self, *_args) -> None:
        """Draw the query parts again, in the map's CRS (also after it changed)."""
        self.overlay.clear()
        for geometry, negative, crs_wkt in self.query_parts:
            self._show_query_part(geometry, negative, crs_wkt)

    def _update_query_label(self, *_args) -> None:
        positives = sum(1 for _geometry, negative, _crs in self.query_parts if not negative)
        negatives = len(self.query_parts) - positives
        if self.search_task is not None:
            # Marks made now steer the next search, not this one.
            text = "Searching…"
        elif self.query_parts:
            text = f"Query {self.query_number}: {positives} positive, {negatives} negative part(s)."
        elif self._query_emptied_by_removal:
            text = f"Query {self.query_number}: no drawn part left; draw one to continue this query."
        else:
            text = "Draw on the map to search."
        # Marks steer every search of this query, also when their rows are no longer listed.
        relevant = len(self.results_table.tiles_marked(Relevance.RELEVANT))
        not_relevant = len(self.results_table.tiles_marked(Relevance.NOT_RELEVANT))
        if relevant or not_relevant:
            text += f" Marked tiles: {relevant} relevant, {not_relevant} not relevant."
        self.query_label.setText(text)
        # The label follows every change of parts and marks, and so do the buttons that edit them.
        self.remove_part_button.setEnabled(bool(self.query_parts))
        self.clear_query_button.setEnabled(bool(self.query_parts) or bool(relevant or not_relevant))

    def _index_changed_on_disk(self) -> bool:
        """Return whether the open index's folder now contains another save than the one opened."""
        stamp = read_manifest_stamp(self.index.folder)
        if stamp is not None and stamp == self._opened_manifest_stamp:
            # The manifest file is the one opened, so it is not read again on every search.
            return False
        try:
            saved = read_manifest_json(Path(self.index.folder) / MANIFEST_NAME)
        except LookalikeError:
            saved = None
        if saved is None:
            # The folder or its manifest is gone or damaged: opening it again reports that.
            return True
        opened = self.index.manifest
        if (saved.get("generation"), saved.get("index_id")) != (opened.get("generation"), opened.get("index_id")):
            return True
        # The same save with a new file stamp (copied back, touched): the next search compares with it.
        self._opened_manifest_stamp = stamp
        return False

    def query_layer_name(self) -> str:
        return f"Lookalike query {self.query_number}"

    # -- search --------------------------------------------------------------------------------

    def start_search(self) -> Optional[LookalikeTask]:
        if self.index is None:
            if self.build_task is not None:
                self.push_message(
                    "The index is being built; search when the build has finished.", Qgis.MessageLevel.Info
                )
                return None
            self.push_message(
                "No index is open; build an index or choose an index folder first.", Qgis.MessageLevel.Warning
            )
            return None
        self._forget_marks_of_other_index()
        relevant = tuple(self.results_table.tiles_marked(Relevance.RELEVANT))
        not_relevant = tuple(self.results_table.tiles_marked(Relevance.NOT_RELEVANT))
        if not self.query_parts and not relevant:
            self.push_message("Draw a query on the map first (rectangle, polygon or point).", Qgis.MessageLevel.Info)
            return None

        if self.search_task is not None:
            # One search at a time; the latest query runs when the current one ends.
            self._search_again = True
            return None
        if self._index_changed_on_disk():
            # Another build added or replaced tiles: tile ids of the copy in memory may now name
            # other tiles, so the search waits for the index as it is on disk.
            self.push_message(
                f"The index in {self.index.folder} was changed, moved or deleted by another build or program since "
                "it was opened, so it is opened again before the search runs.",
                Qgis.MessageLevel.Info,
            )
            self._search_after_open = True
            self.open_index(str(self.index.folder))
            return None
        if not self.query_parts and not self._query_emptied_by_removal:
            # Marks made after Clear query start a new query, as a drawn part does, so the layer of
            # the query before stays in the project.
            self._next_query_number()
            self._query_emptied_by_removal = True

        encoder = self._encoder_cache
        if encoder is not None and encoder.checksum != self.index.encoder_info.get("checksum"):
            encoder = None
        request = jobs.SearchRequest(
            index=self.index,
            parts=tuple(
                jobs.QueryPart(wkt=geometry.asWkt(), crs_wkt=crs_wkt, negative=negative)
                for geometry, negative, crs_wkt in self.query_parts
            ),
            k=self.k_spin.value(),
            encoder=encoder,
            encoder_path=self.encoder_path(),
            relevant_tile_ids=relevant,
            not_relevant_tile_ids=not_relevant,
        )

        index_identity = self.index.identity
        query_number = self.query_number
        task = LookalikeTask(
            f"Lookalike: search {self.query_layer_name()}",
            lambda running: jobs.search_work(request, running),
            lambda done: self._on_search_finished(done, index_identity, query_number),
        )
        self.search_task = task
        self.search_button.setText("Cancel search")
        self.query_label.setText("Searching…")
        self._store_state()
        return self._start_task(task)

    def _forget_marks_of_other_index(self) -> None:
        """Clear relevance marks made on another index: their tile ids mean other tiles here."""
        marked = self.results_table.tiles_marked(Relevance.RELEVANT) + self.results_table.tiles_marked(
            Relevance.NOT_RELEVANT
        )
        if not marked or self._results_index_identity == self.index.identity:
            return
        if self._results_index_identity is not None and Path(self._results_index_identity[0]) == Path(
            self.index.identity[0]
        ):
            self.results_table.clear_marks()
            self.push_message(
                f"The {len(marked)} relevance mark(s) were made on an earlier build of this index and are cleared; "
                "mark the matches of this index again.",
                Qgis.MessageLevel.Info,
            )
            return
        self._set_marks_aside()
        self.results_table.clear_marks()
        self.push_message(
            f"The {len(marked)} relevance mark(s) were made on another index, so this search does not use them; "
            "they come back when that index is open again. Mark the matches of this index to steer its search.",
            Qgis.MessageLevel.Info,
        )

    def _on_search_button_clicked(self) -> None:
        if self.search_task is None:
            self.start_search()
            return
        self._search_again = False
        self.search_task.cancel()
        self.query_label.setText("Cancelling the search…")

    def _on_search_finished(
        self, task: LookalikeTask, index_identity: Optional[tuple] = None, query_number: int = 0
    ) -> None:
        self.search_task = None
        self.search_button.setText("Search")
        self._update_query_label()
        if task.outcome is TaskOutcome.SUCCEEDED and (self.index is None or index_identity != self.index.identity):
            # The index was replaced while the search ran: its tile ids mean other tiles now.
            self.push_message(
                "A search finished after its index was replaced (another index opened, or this one built again), "
                "so its matches are not shown; search again to query the open index.",
                Qgis.MessageLevel.Info,
            )
        elif task.outcome is TaskOutcome.SUCCEEDED:
            outcome: jobs.SearchOutcome = task.result
            self._encoder_cache = outcome.encoder
            self._results_index_identity = index_identity
            self.show_matches(outcome.matches, outcome.encoder.name)
            for warning in outcome.warnings:
                self.push_message(warning, Qgis.MessageLevel.Warning)
        elif task.outcome is TaskOutcome.FAILED:
            self._report_failure("The search", task)
            error = task.error
            # Parts keep their positions until the query is cleared, which starts a new query.
            if isinstance(error, jobs.QueryPartError) and query_number == self.query_number:
                self._remove_query_part(error.position)
                if self.query_parts:
                    self.push_message(
                        f"Query part {error.position + 1} was removed, so the query runs again without it.",
                        Qgis.MessageLevel.Info,
                    )
                    self._search_again = True
                else:
                    self.push_message("That query part was removed; draw a new one to search.", Qgis.MessageLevel.Info)
                    if not self.project.mapLayersByName(self.query_layer_name()) and not self.results_table.marks():
                        # The query never had a match or a mark, so the next drawing takes its number.
                        self.query_number = self._query_number_before_new
                    else:
                        # The query keeps its layer and marks, and the next drawing continues it.
                        self._query_emptied_by_removal = True
                    self._update_query_label()
        if self._search_again:
            self._search_again = False
            self.start_search()

    def show_matches(self, found: list, encoder_name: str) -> None:
        """Replace this query's result layer, table and histogram with ``found``."""
        name = self.query_layer_name()
        old_layer = self.project.mapLayer(self.result_layer_id) if self.result_layer_id else None
        if old_layer is not None and old_layer.name() == name:
            # Replacing the layer is not the analyst removing it: the marks stay.
            self.result_layer_id = ""
            self.project.removeMapLayer(old_layer.id())
        self.matches = found
        try:
            layer = match_layers.matches_to_memory_layer(
                found,
                name=name,
                crs=self.canvas.mapSettings().destinationCrs(),
                encoder_name=encoder_name,
                query_label=name,
            )
        except LookalikeError as error:
            self.push_message(str(error), Qgis.MessageLevel.Critical)
            return
        style_result_layer(layer)
        remember_matches(layer, found, self._results_index_identity or ("", ""), encoder_name)
        self.watch_result_layer(layer)
        self.project.addMapLayer(layer)
        self.result_layer_id = layer.id()

        self._fill_result_views(found)
        if not found:
            # Searches widen until k matches survive, so none means every tile overlaps the query.
            self.push_message(
                "The search found no matches: every indexed tile overlaps the query, and tiles under the "
                "query are never returned. Draw a smaller query, or build the index at a finer GSD, which "
                "makes the tiles smaller."
            )
        self._load_thumbnails(found)

    def _fill_result_views(self, found: list, min_score: Optional[float] = None, keep_rows: bool = False) -> None:
        """Show ``found`` in the table and histogram, with the slider at ``min_score`` (None: every match).

        With ``keep_rows`` the table already lists ``found``, and its rows keep their thumbnails.
        """
        if not keep_rows:
            self.results_table.set_matches(found)
        self.histogram.set_scores([match.score for match in found])
        position = 0
        if min_score is not None and found:
            # A threshold the slider set maps back to the same slider position.
            low, high = self.histogram.score_range()
            position = min(max(round((min_score - low) / (high - low) * THRESHOLD_STEPS), 0), THRESHOLD_STEPS)
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(position)
        self.threshold_slider.blockSignals(False)
        self._on_threshold_changed(position)

    def continue_saved_query(self, session: Optional[QuerySession]) -> None:
        """Show the saved query's matches and marks again, when they came from the index now open."""
        if session is None or self.index is None:
            return
        if session.results_index is None or session.results_index[1] != self.index.identity[1]:
            # Their tile ids would name other tiles of this index, so this query's next matches go
            # to a layer of a new name.
            self._free_query_name()
            if session.marks:
                self.push_message(
                    f"The {len(session.marks)} relevance mark(s) saved with this project were made on another "
                    "build of the index, whose tiles may differ, so they are not restored; mark the matches again.",
                    Qgis.MessageLevel.Info,
                )
            self._update_query_label()
            return
        layer = self.project.mapLayer(session.result_layer_id) if session.result_layer_id else None
        matches = stored_matches(layer, self.index) if isinstance(layer, QgsVectorLayer) else None
        if matches is not None:
            self._results_index_identity = self.index.identity
            self.result_layer_id = layer.id()
            self.matches = matches
            self._fill_result_views(matches, stored_min_score(layer))
            self._load_thumbnails(matches)
        else:
            self._free_query_name()
        # A mark edited by hand may name no tile of this index.
        marks = {tile_id: mark for tile_id, mark in session.marks.items() if 0 <= tile_id < self.index.count}
        if len(marks) < len(session.marks):
            LOGGER.warning("%d saved relevance mark(s) name no tile of %s and were left out",
                           len(session.marks) - len(marks), self.index.folder)
        if marks:
            self._results_index_identity = self.index.identity
            self.results_table.restore_marks(marks)
        self._update_query_label()

    def _free_query_name(self) -> None:
        """Move the query number past layers of the project that already have this query's name."""
        while self.query_parts and self.project.mapLayersByName(self.query_layer_name()):
            self.query_number += 1

    def set_results_of_other_index_aside(self) -> None:
        """Stop showing matches and marks of another index (or an earlier build) in the table."""
        if self._results_index_identity is None or self.index is None:
            return
        if self._results_index_identity == self.index.identity:
            return
        previous_folder = self._results_index_identity[0]
        is_earlier_build = Path(self.index.identity[0]) == Path(previous_folder)
        layer = self.result_layer()
        had_matches = bool(self.matches)
        had_marks = bool(self.results_table.marks())
        if had_marks and not is_earlier_build:
            self._set_marks_aside()

        self._results_index_identity = None
        self.result_layer_id = ""
        self.matches = []
        self.results_table.clear_marks()
        self._fill_result_views([])
        if layer is not None and self.query_parts:
            # The parts stay, as the analyst may search the same place in another date's index, but
            # their matches here go to a new layer instead of replacing the other index's.
            self._next_query_number()
        self._update_query_label()
        if not (had_matches or had_marks):
            return

        source = "an earlier build of this index" if is_earlier_build else "another index"
        kept = f"; they stay in the layer '{layer.name()}'" if layer is not None else ""
        marks = ""
        if had_marks:
            marks = (", and their relevance marks are cleared" if is_earlier_build
                     else ", and their relevance marks are set aside until that index is open again")
        self.push_message(
            f"The matches shown came from {source}{kept}{marks}. Search again to find matches in this index.",
            Qgis.MessageLevel.Info,
        )

    def _set_marks_aside(self) -> None:
        if self._results_index_identity is not None:
            self._marks_set_aside[self._results_index_identity] = dict(self.results_table.marks())

    def restore_marks_set_aside(self) -> None:
        """Bring back the marks made on the open index before another index replaced it.

        Marks restored from the saved project win, because they are the ones the project stored last.
        """
        if self.index is None:
            return
        marks = self._marks_set_aside.pop(self.index.identity, None)
        if not marks or self.results_table.marks():
            return
        marks = {tile_id: mark for tile_id, mark in marks.items() if 0 <= tile_id < self.index.count}
        if not marks:
            return
        self._results_index_identity = self.index.identity
        self.results_table.restore_marks(marks)
        self._update_query_label()
        self.push_message(
            f"The {len(marks)} relevance mark(s) made on this index before another index was opened are back; "
            "search again to use them.",
            Qgis.MessageLevel.Info,
        )

    def result_layer(self) -> Optional[QgsVectorLayer]:
        layer = self.project.mapLayer(self.result_layer_id) if self.result_layer_id else None
        return layer if isinstance(layer, QgsVectorLayer) else None

    def score_threshold(self) -> float:
        """Return the lowest score shown: the slider's position on the histogram's score range.

        At the slider's start every match is shown, whatever rounding the range has. The histogram
        pads a range of tied scores, so the slider's end is held at the best match.
        """
        low, high = self.histogram.score_range()
        threshold = low + (high - low) * self.threshold_slider.value() / THRESHOLD_STEPS
        if not self.matches:
            return threshold
        if self.threshold_slider.value() == 0:
            threshold = min(match.score for match in self.matches)
        return min(threshold, max(match.score for match in self.matches))

    def _on_threshold_changed(self, _value: int) -> None:
        if not self.matches:
            self.threshold_label.setText("–")
            self.histogram.set_threshold(None)
            return
        threshold = self.score_threshold()
        shown = self.results_table.apply_score_threshold(threshold)
        self.histogram.set_threshold(threshold)
        self.threshold_label.setText(f"≥ {threshold:.3f} ({shown} shown)")
        layer = self.result_layer()
        if layer is not None:
            apply_score_threshold(layer, threshold)
