"""The Lookalike panel: build an index of a raster layer, draw a query, review and export matches.

Long work (loading an encoder, building, searching, reading thumbnails, exporting chips) runs in
``LookalikeTask`` objects. Their ``run()`` gets only plain values gathered here on the main
thread, and their results come back through ``finished()``. The dock keeps a reference to every
task it started until that task finishes, because PyQGIS deletes a task whose Python object is
garbage-collected while the task manager still runs it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

from qgis.core import Qgis, QgsApplication, QgsGeometry, QgsProject
from qgis.gui import QgsDockWidget
from qgis.PyQt.QtWidgets import QMessageBox, QPushButton, QScrollArea, QVBoxLayout, QWidget

from ..core import get_logger
from ..core.encoder import OnnxEncoder
from ..core.errors import LookalikeError, with_field_names
from ..core.index import TileIndex
from ..gis.tasks import LookalikeTask, TaskOutcome
from . import jobs, project_state
from .build_panel import BuildPanelMixin, default_gsd_m, progress_text
from .dock_constants import (
    CHIP_FORMATS,
    DEFAULT_K,
    DEFAULT_OVERLAP_PERCENT,
    EXPORT_FORMATS,
    EXTENT_LABELS,
    EXTENT_MAP_VIEW,
    EXTENT_POLYGONS,
    EXTENT_SELECTED,
    EXTENT_WHOLE_LAYER,
    MESSAGE_TITLE,
    METRES_PER_DEGREE,
    OTHER_ENCODER,
    PANEL_FIELD_NAMES,
    THRESHOLD_STEPS,
)
from .map_tools import PointQueryTool, PolygonQueryTool, QueryOverlay, RectangleQueryTool
from .query_session import QuerySession, read_session, write_session
from .results_panel import ResultsPanelMixin
from .search_panel import SearchPanelMixin

__all__ = [
    "CHIP_FORMATS",
    "DEFAULT_K",
    "DEFAULT_OVERLAP_PERCENT",
    "EXPORT_FORMATS",
    "EXTENT_LABELS",
    "EXTENT_MAP_VIEW",
    "EXTENT_POLYGONS",
    "EXTENT_SELECTED",
    "EXTENT_WHOLE_LAYER",
    "MESSAGE_TITLE",
    "METRES_PER_DEGREE",
    "OTHER_ENCODER",
    "THRESHOLD_STEPS",
    "LookalikeDockWidget",
    "default_gsd_m",
    "progress_text",
]

LOGGER = get_logger("ui.dock")


class LookalikeDockWidget(BuildPanelMixin, SearchPanelMixin, ResultsPanelMixin, QgsDockWidget):
    """The panel the plugin shows: index, search, results and export sections in one scroll area."""

    def __init__(self, iface, parent: Optional[QWidget] = None) -> None:
        super().__init__("Lookalike", parent)
        self.setObjectName("LookalikeDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.project = QgsProject.instance()

        self.index: Optional[TileIndex] = None
        self.matches: list = []
        self.result_layer_id = ""
        # Tile id of each feature of the result layers, by layer id and feature id, so that the
        # matches of features the analyst deletes can be left out (the deleted features are gone).
        self._result_feature_tiles: Dict[str, Dict[int, int]] = {}
        self.query_parts: List[Tuple[QgsGeometry, bool, str]] = []
        self.query_number = 0
        # The number before the current query began, for a query whose only part is rejected.
        self._query_number_before_new = 0
        # True while the query's parts were all removed with Remove last part: the next part
        # continues that query (same number, layer and marks) instead of starting a new one.
        self._query_emptied_by_removal = False
        self.last_build_request: Optional[jobs.BuildRequest] = None
        self.encoder_spec = None
        # Why the chosen encoder could not be read, shown when a build is started with it.
        self._encoder_failure: Optional[str] = None
        self._encoder_cache: Optional[OnnxEncoder] = None
        self._tasks: Dict[int, LookalikeTask] = {}
        # Ids of running tasks whose result belongs to a closed project. Their callbacks get them
        # as cancelled.
        self._discarded_task_ids: Set[int] = set()
        self._cleaned_up = False
        # Counts project clears, so that a build started for a closed project opens nothing in the next one.
        self.project_epoch = 0
        self.build_task: Optional[LookalikeTask] = None
        self.search_task: Optional[LookalikeTask] = None
        self._search_again = False
        # Set when a search found the index changed on disk: it runs once the index is open again.
        self._search_after_open = False
        # The manifest file stamp taken when the open index was read, to notice saves by others.
        self._opened_manifest_stamp = None
        self._restoring = False
        self._opening_index_folder = ""
        self._index_opening = False
        # The query of a project being opened, continued once its index is open.
        self._saved_query: Optional[QuerySession] = None
        # The GSD and overlap the analyst had set before the fields began to show an index's grid.
        self._own_grid_values: Optional[tuple[float, int]] = None

        self._build_widgets()
        self.overlay = QueryOverlay(self.canvas)
        self.map_tools = {
            "rectangle": RectangleQueryTool(self.canvas),
            "polygon": PolygonQueryTool(self.canvas),
            "point": PointQueryTool(self.canvas),
        }
        for name, tool in self.map_tools.items():
            tool.queryDrawn.connect(self.add_query_geometry)
            tool.queryRejected.connect(self._on_query_rejected)
            tool.setAction(self.tool_buttons[name].defaultAction())
        self.canvas.mapToolSet.connect(self._on_map_tool_set)
        self.canvas.destinationCrsChanged.connect(self.redraw_query_parts)

        self.project.readProject.connect(self._on_project_read)
        self.project.writeProject.connect(self._on_project_written)
        self.project.cleared.connect(self._on_project_cleared)
        self._on_encoder_choice_changed()
        self._on_raster_layer_changed(self.raster_combo.currentLayer())
        self.restore_from_project()

    # -- widgets -------------------------------------------------------------------------------

    def _build_widgets(self) -> None:
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(self._build_index_group())
        layout.addWidget(self._build_search_group())
        layout.addWidget(self._build_results_group())
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        self.setWidget(scroll)

    def _checkable_action(self, label: str, tip: str):
        from qgis.PyQt.QtWidgets import QAction

        action = QAction(label, self)
        action.setCheckable(True)
        action.setToolTip(tip)
        return action

    # -- messages ------------------------------------------------------------------------------

    def push_message(self, text: str, level=Qgis.MessageLevel.Info, duration_s: int = 8) -> None:
        """Show a sentence in the QGIS message bar under the plugin's title; errors stay until closed."""
        if level == Qgis.MessageLevel.Critical:
            duration_s = 0
        text = with_field_names(text, PANEL_FIELD_NAMES, "this panel")
        self.iface.messageBar().pushMessage(MESSAGE_TITLE, text, level, duration_s)

    def _push_with_button(self, text: str, button_text: str, callback, level=Qgis.MessageLevel.Warning):
        """Show ``text`` with a button that runs ``callback`` and closes the message; return the message item."""
        bar = self.iface.messageBar()
        item = bar.createMessage(MESSAGE_TITLE, text)
        button = QPushButton(button_text)
        button.setObjectName("lookalikeMessageButton")
        button.clicked.connect(callback)
        button.clicked.connect(lambda: bar.popWidget(item))
        item.layout().addWidget(button)
        bar.pushWidget(item, level)
        return item

    def _confirmed(self, question: str) -> bool:
        """Ask ``question`` with Yes and No (the default); return True for Yes."""
        answer = QMessageBox.question(
            self,
            MESSAGE_TITLE,
            question,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _report_failure(self, action: str, task: LookalikeTask) -> None:
        error = task.error
        if isinstance(error, LookalikeError):
            text = str(error)
        else:
            text = f"{action} failed: {error}. The Lookalike log panel has the details."
        self.push_message(text, Qgis.MessageLevel.Critical)

    def _on_query_rejected(self, text: str) -> None:
        self.push_message(text, Qgis.MessageLevel.Warning)

    # -- tasks ---------------------------------------------------------------------------------

    def _start_task(self, task: LookalikeTask) -> LookalikeTask:
        self._tasks[id(task)] = task
        callback = task.on_finished

        def finished(done: LookalikeTask) -> None:
            self._tasks.pop(id(done), None)
            if id(done) in self._discarded_task_ids:
                self._discarded_task_ids.discard(id(done))
                # The task may have ended before the cancel reached it; its result is stale anyway.
                done.outcome = TaskOutcome.CANCELLED
                done.result = None
            if callback is not None:
                callback(done)

        task.on_finished = finished
        QgsApplication.taskManager().addTask(task)
        return task

    def running_tasks(self) -> List[LookalikeTask]:
        return list(self._tasks.values())

    def _discard_task(self, task: LookalikeTask) -> None:
        """Cancel ``task`` and hand it to its callback as cancelled even if it succeeds meanwhile."""
        self._discarded_task_ids.add(id(task))
        task.cancel()

    # -- project -------------------------------------------------------------------------------

    def _store_state(self) -> None:
        if self._restoring:
            return
        layer = self.raster_combo.currentLayer()
        state = project_state.DockState(
            index_folder=str(self.index.folder) if self.index is not None else self.index_folder.filePath(),
            raster_layer_id=layer.id() if layer is not None else "",
            band_indexes=",".join(str(combo.currentBand()) for combo in self.band_combos if combo.currentBand() > 0),
            encoder_path=self.encoder_path(),
            gsd=self.gsd_spin.value(),
            overlap_percent=self.overlap_spin.value(),
            extent_mode=self.extent_combo.currentData() or "",
            k=self.k_spin.value(),
        )
        project_state.write_state(state, self.project)
        write_session(self.query_session(), self.project)

    def restore_from_project(self) -> None:
        fallbacks: list[tuple[str, str]] = []
        state = project_state.read_state(self.project, fallbacks)
        if not state.index_folder and not state.raster_layer_id:
            return
        for relative_path, absolute_path in fallbacks:
            # A project copied without its index would otherwise build into the original project's index.
            self.push_message(
                f"{relative_path} (the path saved relative to the project) does not exist, so Lookalike uses "
                f"{absolute_path}, where it was when the project was saved. Choose another folder or file in the "
                "panel to work elsewhere.",
                Qgis.MessageLevel.Info,
            )
        problems: list[str] = []
        self._saved_query = read_session(self.project, problems)
        if self._saved_query is not None:
            self.restore_query(self._saved_query)
        for problem in problems:
            self.push_message(
                f"The Lookalike query saved in this project cannot be restored ({problem}); draw it again.",
                Qgis.MessageLevel.Warning,
            )
        self._restoring = True
        try:
            layer = self.project.mapLayer(state.raster_layer_id) if state.raster_layer_id else None
            if layer is not None:
                self.raster_combo.setLayer(layer)
            self.restore_band_choice(state.band_indexes)
            if state.encoder_path:
                position = self.encoder_combo.findData(state.encoder_path)
                if position >= 0:
                    self.encoder_combo.setCurrentIndex(position)
                else:
                    self.encoder_combo.setCurrentIndex(self.encoder_combo.findData(OTHER_ENCODER))
                    self.encoder_file.setFilePath(state.encoder_path)
            if state.gsd is not None and state.gsd > 0:
                # Taken as the analyst's choice: the encoder, which may still be loading, and a
                # raster chosen later keep it.
                self.gsd_spin.setValue(state.gsd)
            if state.overlap_percent is not None:
                self.overlap_spin.setValue(state.overlap_percent)
            position = self.extent_combo.findData(state.extent_mode)
            if position >= 0:
                self.extent_combo.setCurrentIndex(position)
            if state.k is not None and state.k > 0:
                self.k_spin.setValue(state.k)
            self.index_folder.setFilePath(state.index_folder)
        finally:
            self._restoring = False
        # Read now from the folder's manifest, because a build started before the index opens
        # must already use the index's grid.
        self._follow_index_grid()
        if state.index_folder:
            self.open_index(state.index_folder)

    def _on_project_written(self, *_args) -> None:
        # QGIS writes the project's entries after this signal, so the settings as they are now
        # reach the file, whenever they were changed.
        self._store_state()

    def _on_project_read(self, *_args) -> None:
        self.restore_from_project()

    def _on_project_cleared(self) -> None:
        # A search or index opening started for the closed project would otherwise add its
        # result layer, or its index, to the next project. Builds and chip exports keep running
        # because their output is files on disk.
        if self.search_task is not None:
            self._discard_task(self.search_task)
        self._search_again = False
        self._search_after_open = False
        self._opening_index_folder = ""
        self._index_opening = False
        self.project_epoch += 1
        for tool in self.map_tools.values():
            tool.cancel_drawing()
        self.clear_query()
        # A percentage of the closed project's build would read as a build of the next project.
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(False)
        # Query layers of the next project are named from 1 again.
        self.query_number = 0
        self._query_number_before_new = 0
        self.index = None
        self.matches = []
        self.result_layer_id = ""
        self._result_feature_tiles.clear()
        self._results_index_identity = None
        self._saved_query = None
        self.results_table.set_matches([])
        self.histogram.set_scores([])
        self.status_label.setText("No index open.")
        # A Resume clicked in the next project would open the closed project's index there.
        # Building again with the same settings still continues from the kept tiles.
        for folder_key in list(self._resume_items):
            self._remove_resume_message(folder_key)

    # -- life cycle ----------------------------------------------------------------------------

    def hideEvent(self, event) -> None:  # noqa: N802 - Qt override
        # Closing or hiding the dock hides it explicitly (isHidden() is true). Qt moves a dock
        # that another panel's tab covers out of view without hiding it, so that dock keeps its tool.
        if self.isHidden() and not self._cleaned_up:
            self.release_map_tool()
        super().hideEvent(event)

    def release_map_tool(self) -> None:
        """Take the dock's query tool off the canvas and drop any half-drawn part."""
        for tool in self.map_tools.values():
            # unsetMapTool ignores a tool that is not current, but it also clears the canvas's
            # saved "last non-zoom tool", which may still point to one of these tools.
            self.canvas.unsetMapTool(tool)
            tool.cancel_drawing()

    def cleanup(self) -> None:
        """Cancel running tasks, delete the map tools and rubber bands, and disconnect from the project.

        Calling it again does nothing.
        """
        if self._cleaned_up:
            return
        self._cleaned_up = True
        # The task outlives the panel; its signals must not reach deleted widgets.
        self.detach_build_task()
        for task in self.running_tasks():
            task.on_finished = None
            task.cancel()
        self._tasks.clear()
        self._discarded_task_ids.clear()
        self.release_map_tool()
        for tool in self.map_tools.values():
            # The canvas is the tools' Qt parent and outlives the dock, so it would keep them alive.
            tool.deleteLater()
        self.overlay.clear()
        connections = [
            (self.project.readProject, self._on_project_read),
            (self.project.writeProject, self._on_project_written),
            (self.project.cleared, self._on_project_cleared),
            (self.canvas.mapToolSet, self._on_map_tool_set),
            (self.canvas.destinationCrsChanged, self.redraw_query_parts),
        ]
        if hasattr(self, "_on_layer_will_be_removed"):
            connections.append((self.project.layerWillBeRemoved, self._on_layer_will_be_removed))
        for layer_id in self._result_feature_tiles:
            layer = self.project.mapLayer(layer_id)
            if layer is not None:
                connections.append((layer.committedFeaturesRemoved, self._on_result_features_removed))
        self._result_feature_tiles.clear()
        for signal, slot in connections:
            try:
                signal.disconnect(slot)
            except TypeError:
                LOGGER.debug("%s was not connected", slot.__name__)
