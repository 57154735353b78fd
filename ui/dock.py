"""The Lookalike panel: build an index of a raster layer, draw a query, review and export matches.

Long work (loading an encoder, building, searching, reading thumbnails, exporting chips) runs in
``LookalikeTask`` objects. Their ``run()`` gets only plain values gathered here on the main
thread, and their results come back through ``finished()``. The dock keeps a reference to every
task it started until that task finishes, because PyQGIS deletes a task whose Python object is
garbage-collected while the task manager still runs it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsMapLayer,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core import get_logger
from ..core.encoder import MODELS_DIR, OnnxEncoder
from ..core.errors import LookalikeError
from ..core.index import MANIFEST_NAME, TileIndex
from ..core.pipeline import BuildParameters, Region
from ..gis import matches as match_layers
from ..gis.raster_layers import (
    crs_to_wkt,
    source_spec_for_layer,
    target_crs_wkt,
    written_raster_path,
)
from ..gis.tasks import LookalikeTask, TaskOutcome, TileProgress
from . import jobs, project_state
from .compat import POLYGON_LAYER_FILTER, RASTER_LAYER_FILTER, VECTOR_LAYER_FILTER
from .map_tools import PointQueryTool, PolygonQueryTool, QueryOverlay, RectangleQueryTool
from .result_layer import apply_score_threshold, style_result_layer
from .results import Relevance, ResultsTable, ScoreHistogram

LOGGER = get_logger("ui.dock")
MESSAGE_TITLE = "Lookalike"

EXTENT_WHOLE_LAYER = "whole_layer"
EXTENT_MAP_VIEW = "map_view"
EXTENT_POLYGONS = "polygons"
EXTENT_SELECTED = "selected_polygons"
EXTENT_LABELS = {
    EXTENT_WHOLE_LAYER: "Whole layer",
    EXTENT_MAP_VIEW: "Current map view",
    EXTENT_POLYGONS: "Polygons of a layer",
    EXTENT_SELECTED: "Selected polygons only",
}
OTHER_ENCODER = "other"

DEFAULT_K = 20
DEFAULT_OVERLAP_PERCENT = 50
# The slider maps its integer steps onto the score range of the current results.
THRESHOLD_STEPS = 1000
# Metres per degree of latitude, for a default GSD on rasters in geographic CRSs.
METRES_PER_DEGREE = 111320.0

EXPORT_FORMATS = {
    "GeoPackage": ("GPKG", "gpkg"),
    "GeoJSON": ("GeoJSON", "geojson"),
    "CSV": ("CSV", "csv"),
    "ESRI Shapefile": ("ESRI Shapefile", "shp"),
}
CHIP_FORMATS = {"GeoTIFF": "GTiff", "PNG": "PNG"}


def _format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_text(progress: TileProgress) -> str:
    """Describe build progress for the status line, e.g. ``120 of 400 tiles · 35.2 tiles/s · 8 s left``."""
    if progress.tiles_total <= 0:
        return "Reading the layer…"
    parts = [f"{progress.tiles_done} of {progress.tiles_total} tiles"]
    if progress.tiles_skipped:
        parts.append(f"{progress.tiles_skipped} skipped")
    if progress.rate_tiles_per_s > 0:
        parts.append(f"{progress.rate_tiles_per_s:.1f} tiles/s")
        parts.append(f"{_format_duration(progress.eta_s)} left")
    return " · ".join(parts)


class LookalikeDockWidget(QgsDockWidget):
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
        self.query_parts: List[Tuple[QgsGeometry, bool, str]] = []
        self.query_number = 0
        self.last_build_request: Optional[jobs.BuildRequest] = None
        self.encoder_spec = None
        self._encoder_cache: Optional[OnnxEncoder] = None
        self._tasks: Dict[int, LookalikeTask] = {}
        self.build_task: Optional[LookalikeTask] = None
        self.search_task: Optional[LookalikeTask] = None
        self._search_again = False
        self._restoring = False
        self._opening_index_folder = ""

        self._build_widgets()
        self.overlay = QueryOverlay(self.canvas)
        self.map_tools = {
            "rectangle": RectangleQueryTool(self.canvas),
            "polygon": PolygonQueryTool(self.canvas),
            "point": PointQueryTool(self.canvas),
        }
        for name, tool in self.map_tools.items():
            tool.queryDrawn.connect(self.add_query_geometry)
            tool.setAction(self.tool_buttons[name].defaultAction())
        self.canvas.mapToolSet.connect(self._on_map_tool_set)

        self.project.readProject.connect(self._on_project_read)
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

    def _build_index_group(self) -> QGroupBox:
        group = QGroupBox("1 · Index a raster")
        form = QFormLayout(group)

        self.raster_combo = QgsMapLayerComboBox()
        self.raster_combo.setObjectName("lookalikeRasterLayer")
        self.raster_combo.setFilters(RASTER_LAYER_FILTER)
        self.raster_combo.layerChanged.connect(self._on_raster_layer_changed)
        form.addRow("Raster layer", self.raster_combo)

        self.encoder_combo = QComboBox()
        self.encoder_combo.setObjectName("lookalikeEncoder")
        for model_path in sorted(MODELS_DIR.glob("*.onnx")):
            self.encoder_combo.addItem(f"{model_path.stem} (bundled)", str(model_path))
        self.encoder_combo.addItem("Other ONNX file…", OTHER_ENCODER)
        self.encoder_combo.currentIndexChanged.connect(self._on_encoder_choice_changed)
        form.addRow("Encoder", self.encoder_combo)
        self.encoder_file = QgsFileWidget()
        self.encoder_file.setObjectName("lookalikeEncoderFile")
        self.encoder_file.setFilter("ONNX models (*.onnx)")
        self.encoder_file.fileChanged.connect(self._on_encoder_choice_changed)
        form.addRow("", self.encoder_file)
        self.encoder_info = QLabel("–")
        self.encoder_info.setWordWrap(True)
        form.addRow("", self.encoder_info)

        self.gsd_spin = QDoubleSpinBox()
        self.gsd_spin.setObjectName("lookalikeGsd")
        self.gsd_spin.setDecimals(3)
        self.gsd_spin.setRange(0.001, 100000.0)
        self.gsd_spin.setSuffix(" m/px")
        self.gsd_spin.setToolTip(
            "Ground sample distance of the chips the encoder sees, in metres per encoder pixel"
        )
        self.gsd_spin.valueChanged.connect(self._update_tile_size_label)
        form.addRow("GSD", self.gsd_spin)
        self.tile_size_label = QLabel("–")
        form.addRow("Tile size", self.tile_size_label)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setObjectName("lookalikeOverlap")
        self.overlap_spin.setRange(0, 90)
        self.overlap_spin.setValue(DEFAULT_OVERLAP_PERCENT)
        self.overlap_spin.setSuffix(" %")
        self.overlap_spin.setToolTip("Overlap between neighbouring tiles; 50 % halves the step between tiles")
        form.addRow("Overlap", self.overlap_spin)

        self.extent_combo = QComboBox()
        self.extent_combo.setObjectName("lookalikeExtent")
        for key, label in EXTENT_LABELS.items():
            self.extent_combo.addItem(label, key)
        self.extent_combo.currentIndexChanged.connect(self._on_extent_mode_changed)
        form.addRow("Extent", self.extent_combo)
        self.extent_layer_combo = QgsMapLayerComboBox()
        self.extent_layer_combo.setObjectName("lookalikeExtentLayer")
        self.extent_layer_combo.setFilters(POLYGON_LAYER_FILTER)
        form.addRow("", self.extent_layer_combo)
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setObjectName("lookalikeMaskLayer")
        self.mask_combo.setFilters(POLYGON_LAYER_FILTER)
        self.mask_combo.setAllowEmptyLayer(True)
        self.mask_combo.setLayer(None)
        self.mask_combo.setToolTip("Tiles mostly under these polygons (clouds, water…) are skipped")
        form.addRow("Mask (optional)", self.mask_combo)

        self.index_folder = QgsFileWidget()
        self.index_folder.setObjectName("lookalikeIndexFolder")
        self.index_folder.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.index_folder.setToolTip("Folder the index is written to, or an existing index to open")
        self.index_folder.fileChanged.connect(self._on_index_folder_changed)
        form.addRow("Index folder", self.index_folder)
        self.add_to_index_check = QCheckBox("Add this raster to the existing index")
        self.add_to_index_check.setObjectName("lookalikeAddToIndex")
        form.addRow("", self.add_to_index_check)

        buttons = QHBoxLayout()
        self.build_button = QPushButton("Build index")
        self.build_button.setObjectName("lookalikeBuild")
        self.build_button.clicked.connect(self.start_build)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("lookalikeCancelBuild")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_build)
        buttons.addWidget(self.build_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("lookalikeBuildProgress")
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        form.addRow(self.progress_bar)
        self.status_label = QLabel("No index open.")
        self.status_label.setObjectName("lookalikeIndexStatus")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        self._on_extent_mode_changed()
        return group

    def _build_search_group(self) -> QGroupBox:
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
        self.search_button.clicked.connect(self.start_search)
        run_row.addWidget(self.search_button)
        self.clear_query_button = QPushButton("Clear query")
        self.clear_query_button.setObjectName("lookalikeClearQuery")
        self.clear_query_button.clicked.connect(self.clear_query)
        run_row.addWidget(self.clear_query_button)
        layout.addLayout(run_row)
        self.query_label = QLabel("Draw on the map to search.")
        self.query_label.setObjectName("lookalikeQueryStatus")
        self.query_label.setWordWrap(True)
        layout.addWidget(self.query_label)
        return group

    def _build_results_group(self) -> QGroupBox:
        group = QGroupBox("3 · Results")
        layout = QVBoxLayout(group)
        self.histogram = ScoreHistogram()
        layout.addWidget(self.histogram)
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(QLabel("Min score"))
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setObjectName("lookalikeThreshold")
        self.threshold_slider.setRange(0, THRESHOLD_STEPS)
        self.threshold_slider.setValue(0)
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        threshold_row.addWidget(self.threshold_slider, 1)
        self.threshold_label = QLabel("–")
        self.threshold_label.setMinimumWidth(90)
        threshold_row.addWidget(self.threshold_label)
        layout.addLayout(threshold_row)

        self.results_table = ResultsTable()
        self.results_table.matchActivated.connect(self.zoom_to_match)
        layout.addWidget(self.results_table)

        marks_row = QHBoxLayout()
        for label, relevance, name in (
            ("Relevant", Relevance.RELEVANT, "lookalikeMarkRelevant"),
            ("Not relevant", Relevance.NOT_RELEVANT, "lookalikeMarkNotRelevant"),
            ("Clear mark", Relevance.UNMARKED, "lookalikeClearMark"),
        ):
            button = QPushButton(label)
            button.setObjectName(name)
            button.clicked.connect(lambda _checked, mark=relevance: self.mark_selected(mark))
            marks_row.addWidget(button)
        layout.addLayout(marks_row)

        export_row = QHBoxLayout()
        self.export_format_combo = QComboBox()
        self.export_format_combo.setObjectName("lookalikeExportFormat")
        self.export_format_combo.addItems(list(EXPORT_FORMATS))
        self.export_button = QPushButton("Export layer…")
        self.export_button.setObjectName("lookalikeExportLayer")
        self.export_button.clicked.connect(self.export_layer_with_dialog)
        export_row.addWidget(self.export_format_combo, 1)
        export_row.addWidget(self.export_button)
        layout.addLayout(export_row)

        chips_row = QHBoxLayout()
        self.chip_format_combo = QComboBox()
        self.chip_format_combo.setObjectName("lookalikeChipFormat")
        self.chip_format_combo.addItems(list(CHIP_FORMATS))
        self.export_chips_button = QPushButton("Export chips…")
        self.export_chips_button.setObjectName("lookalikeExportChips")
        self.export_chips_button.setToolTip(
            "Write the chips of the selected rows (all shown rows when none is selected) and a labels CSV"
        )
        self.export_chips_button.clicked.connect(self.export_chips_with_dialog)
        chips_row.addWidget(self.chip_format_combo, 1)
        chips_row.addWidget(self.export_chips_button)
        layout.addLayout(chips_row)
        return group

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
        self.iface.messageBar().pushMessage(MESSAGE_TITLE, text, level, duration_s)

    def _push_with_button(self, text: str, button_text: str, callback, level=Qgis.MessageLevel.Warning) -> None:
        bar = self.iface.messageBar()
        item = bar.createMessage(MESSAGE_TITLE, text)
        button = QPushButton(button_text)
        button.setObjectName("lookalikeMessageButton")
        button.clicked.connect(callback)
        button.clicked.connect(lambda: bar.popWidget(item))
        item.layout().addWidget(button)
        bar.pushWidget(item, level)

    def _report_failure(self, action: str, task: LookalikeTask) -> None:
        error = task.error
        if isinstance(error, LookalikeError):
            text = str(error)
        else:
            text = f"{action} failed: {error}. The Lookalike log panel has the details."
        self.push_message(text, Qgis.MessageLevel.Critical)

    # -- tasks ---------------------------------------------------------------------------------

    def _start_task(self, task: LookalikeTask) -> LookalikeTask:
        self._tasks[id(task)] = task
        callback = task.on_finished

        def finished(done: LookalikeTask) -> None:
            self._tasks.pop(id(done), None)
            if callback is not None:
                callback(done)

        task.on_finished = finished
        QgsApplication.taskManager().addTask(task)
        return task

    def running_tasks(self) -> List[LookalikeTask]:
        return list(self._tasks.values())

    # -- encoder -------------------------------------------------------------------------------

    def encoder_path(self) -> str:
        choice = self.encoder_combo.currentData()
        if choice == OTHER_ENCODER:
            return self.encoder_file.filePath()
        return choice or ""

    def _on_encoder_choice_changed(self, *_args) -> None:
        self.encoder_file.setVisible(self.encoder_combo.currentData() == OTHER_ENCODER)
        path = self.encoder_path()
        self.encoder_spec = None
        if not path:
            self.encoder_info.setText("Choose an ONNX encoder file.")
            return
        self.encoder_info.setText("Reading the model spec…")
        self._start_task(
            LookalikeTask(
                f"Lookalike: read encoder {Path(path).name}",
                lambda task: OnnxEncoder(path),
                self._on_encoder_loaded,
                can_cancel=False,
            )
        )

    def _on_encoder_loaded(self, task: LookalikeTask) -> None:
        if task.outcome is not TaskOutcome.SUCCEEDED:
            self.encoder_info.setText("This encoder cannot be used; see the message bar.")
            self._report_failure("Reading the encoder", task)
            return
        encoder: OnnxEncoder = task.result
        if str(encoder.path) != self.encoder_path():
            return
        self._encoder_cache = encoder
        spec = encoder.spec
        self.encoder_spec = spec
        gsd_text = f"{spec.gsd_m:g} m/px" if spec.gsd_m else "any (set below)"
        self.encoder_info.setText(
            f"{spec.name} {spec.version}: {spec.input_size_px} px input, bands {', '.join(spec.bands)}, "
            f"GSD {gsd_text}, {spec.embedding_dim}-d embeddings"
        )
        if spec.gsd_m and not self._restoring:
            self.gsd_spin.setValue(spec.gsd_m)
        self._update_tile_size_label()

    def _update_tile_size_label(self, *_args) -> None:
        if self.encoder_spec is None:
            self.tile_size_label.setText("–")
            return
        size_px = self.encoder_spec.input_size_px
        ground_m = size_px * self.gsd_spin.value()
        self.tile_size_label.setText(f"{size_px} px × {self.gsd_spin.value():g} m = {ground_m:g} m")

    # -- raster and extent ---------------------------------------------------------------------

    def _on_raster_layer_changed(self, layer: Optional[QgsMapLayer]) -> None:
        if self._restoring or not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            return
        self.gsd_spin.setValue(default_gsd_m(layer, self.canvas))
        if self.encoder_spec is not None and self.encoder_spec.gsd_m:
            self.gsd_spin.setValue(self.encoder_spec.gsd_m)

    def _on_extent_mode_changed(self, *_args) -> None:
        mode = self.extent_combo.currentData()
        self.extent_layer_combo.setEnabled(mode in (EXTENT_POLYGONS, EXTENT_SELECTED))

    def _extent_polygons(self) -> Tuple[List[str], QgsVectorLayer]:
        layer = self.extent_layer_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer):
            raise LookalikeError("No polygon layer is chosen for the extent; choose one or another extent.")
        selected_only = self.extent_combo.currentData() == EXTENT_SELECTED
        features = layer.selectedFeatures() if selected_only else layer.getFeatures()
        wkts = [feature.geometry().asWkt() for feature in features if feature.hasGeometry()]
        if not wkts:
            which = "selected polygons" if selected_only else "polygons"
            raise LookalikeError(
                f"Layer {layer.name()!r} has no {which} to use as the extent; select polygons or change the extent."
            )
        return wkts, layer

    def build_region(self) -> Tuple[Optional[Region], Optional[Tuple[Tuple[float, float, float, float], str]]]:
        """Return the extent as a core ``Region`` and as bounds with their CRS (None for the whole layer)."""
        mode = self.extent_combo.currentData()
        if mode == EXTENT_WHOLE_LAYER:
            return None, None
        if mode == EXTENT_MAP_VIEW:
            extent = self.canvas.extent()
            crs_wkt = crs_to_wkt(self.canvas.mapSettings().destinationCrs())
            bounds = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
            return Region(crs_wkt=crs_wkt, bounds=bounds), (bounds, crs_wkt)
        wkts, layer = self._extent_polygons()
        crs_wkt = crs_to_wkt(layer.crs())
        envelope = QgsGeometry.unaryUnion([QgsGeometry.fromWkt(wkt) for wkt in wkts]).boundingBox()
        bounds = (envelope.xMinimum(), envelope.yMinimum(), envelope.xMaximum(), envelope.yMaximum())
        return Region(crs_wkt=crs_wkt, polygons_wkt=tuple(wkts)), (bounds, crs_wkt)

    def _mask_region(self) -> Optional[Region]:
        layer = self.mask_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer):
            return None
        wkts = [feature.geometry().asWkt() for feature in layer.getFeatures() if feature.hasGeometry()]
        if not wkts:
            return None
        return Region(crs_wkt=crs_to_wkt(layer.crs()), polygons_wkt=tuple(wkts))

    # -- build ---------------------------------------------------------------------------------

    def prepare_build(self) -> jobs.BuildRequest:
        """Gather the build settings into a request; raises LookalikeError naming what is missing."""
        layer = self.raster_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise LookalikeError("No raster layer is chosen; add a raster to the project and choose it.")
        folder = self.index_folder.filePath().strip()
        if not folder:
            raise LookalikeError("No index folder is set; choose a folder to write the index to.")
        encoder_path = self.encoder_path()
        if not encoder_path or not Path(encoder_path).is_file():
            raise LookalikeError(f"The encoder file {encoder_path or '(none)'} is missing; choose an ONNX model.")
        if self.encoder_spec is None:
            raise LookalikeError("The encoder is still loading or cannot be used; wait or choose another model.")

        source = source_spec_for_layer(layer)
        region, bounds_and_crs = self.build_region()
        gsd = self.gsd_spin.value()
        provider_bounds = None
        provider_bounds_crs = ""
        if source.uses_gdal:
            source_paths = (source.gdal_path,)
        else:
            if bounds_and_crs is None:
                if not layer.dataProvider().capabilities() & QgsRasterDataProvider.Size:
                    raise LookalikeError(
                        f"Layer {layer.name()!r} is a tile or web service that covers the whole world; set the "
                        "extent to the current map view or to polygons."
                    )
                extent = layer.extent()
                bounds_and_crs = (
                    (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()),
                    crs_to_wkt(layer.crs()),
                )
            provider_bounds, provider_bounds_crs = bounds_and_crs
            written_crs = target_crs_wkt(layer.crs(), provider_bounds, provider_bounds_crs)
            envelope = Region(crs_wkt=provider_bounds_crs, bounds=provider_bounds).polygons_in(written_crs)[0]
            box = QgsGeometry.fromWkt(envelope).boundingBox()
            written_bounds = (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())
            source_paths = (str(written_raster_path(folder, source.provider_uri, written_bounds, written_crs, gsd)),)

        params = BuildParameters(
            source_paths=source_paths,
            index_folder=folder,
            encoder_path=encoder_path,
            tile_ground_size_m=gsd * self.encoder_spec.input_size_px,
            overlap_fraction=self.overlap_spin.value() / 100.0,
            extent=region,
            mask=self._mask_region(),
            add_to_existing=self.add_to_index_check.isChecked(),
        )
        return jobs.BuildRequest(
            params=params,
            source=source,
            gsd=gsd,
            provider_bounds=provider_bounds,
            provider_bounds_crs_wkt=provider_bounds_crs,
        )

    def start_build(self) -> Optional[LookalikeTask]:
        if self.build_task is not None:
            return None
        try:
            request = self.prepare_build()
        except LookalikeError as error:
            self.push_message(str(error), Qgis.MessageLevel.Warning)
            return None
        folder = Path(request.params.index_folder)
        if (folder / MANIFEST_NAME).is_file() and not request.params.add_to_existing:
            answer = QMessageBox.question(
                self,
                MESSAGE_TITLE,
                f"{folder} already contains an index. Replace it with a new index of this raster?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No,
            )
            if answer != QMessageBox.StandardButton.Yes:
                return None
            request = replace(request, params=replace(request.params, overwrite_existing_index=True))
        return self.run_build(request)

    def run_build(self, request: jobs.BuildRequest) -> LookalikeTask:
        """Start a build task; rerunning a cancelled request resumes it from its checkpoints."""
        self.last_build_request = request
        if self.index is not None and Path(self.index.folder) == Path(request.params.index_folder):
            # The build replaces the files of the open index.
            self.index = None
        task = LookalikeTask(
            f"Lookalike: index {request.source.layer_name}",
            lambda running: jobs.build_work(request, running),
            self._on_build_finished,
        )
        task.tileProgress.connect(self._on_build_progress)
        task.progressChanged.connect(lambda value: self.progress_bar.setValue(int(value)))
        self.build_task = task
        self.build_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Building the index of {request.source.layer_name}…")
        self._start_task(task)
        return task

    def cancel_build(self) -> None:
        if self.build_task is not None:
            self.build_task.cancel()
            self.status_label.setText("Cancelling after the current batch…")

    def _on_build_progress(self, progress: TileProgress) -> None:
        if progress.tiles_total > 0:
            self.progress_bar.setValue(int(progress.percent))
        self.status_label.setText(progress_text(progress))

    def _on_build_finished(self, task: LookalikeTask) -> None:
        self.build_task = None
        self.build_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        request = self.last_build_request
        if task.outcome is TaskOutcome.SUCCEEDED:
            report = task.result
            self.progress_bar.setValue(100)
            self.open_index(report.index_folder)
            skipped = f", {report.tiles_skipped} skipped" if report.tiles_skipped else ""
            self.push_message(
                f"Index built: {report.tiles_embedded} tiles embedded{skipped} in "
                f"{_format_duration(report.elapsed_s)}. Draw on the map to search.",
                Qgis.MessageLevel.Success,
            )
            return
        if task.outcome is TaskOutcome.CANCELLED:
            self.status_label.setText("Build cancelled; Resume continues where it stopped.")
            self._push_with_button(
                "The build was cancelled. Its finished tiles are kept; resume to continue.",
                "Resume",
                lambda: self.run_build(request) if self.build_task is None else None,
                Qgis.MessageLevel.Info,
            )
            return
        self.status_label.setText("The build failed; see the message bar.")
        self._report_failure("Building the index", task)

    # -- index ---------------------------------------------------------------------------------

    def _on_index_folder_changed(self, path: str) -> None:
        if self._restoring:
            return
        if path and (Path(path) / MANIFEST_NAME).is_file():
            self.open_index(path)
        else:
            self._store_state()

    def open_index(self, folder: str) -> LookalikeTask:
        """Open the index in ``folder`` in a task, because the HNSW graph loads slower as it grows.

        A missing or damaged index gets a message-bar message with a Locate button.
        """
        self._opening_index_folder = str(folder)
        self.status_label.setText(f"Opening the index in {folder}…")
        task = LookalikeTask(
            f"Lookalike: open index {Path(folder).name}",
            lambda _running: TileIndex.open(folder),
            lambda done: self._on_index_opened(str(folder), done),
            can_cancel=False,
        )
        return self._start_task(task)

    def _on_index_opened(self, folder: str, task: LookalikeTask) -> None:
        if folder != self._opening_index_folder:
            # The analyst chose another folder while this one was loading.
            return
        if task.outcome is not TaskOutcome.SUCCEEDED:
            self.index = None
            self.status_label.setText("No index open.")
            self._push_with_button(
                f"The Lookalike index at {folder} cannot be opened ({task.error}). Locate the moved index "
                "folder, or build the index again.",
                "Locate…",
                self.locate_index,
            )
            return
        self.index = task.result
        if self.index_folder.filePath() != folder:
            self._restoring, previous = True, self._restoring
            self.index_folder.setFilePath(folder)
            self._restoring = previous
        encoder = self.index.encoder_info
        self.status_label.setText(
            f"Index open: {self.index.count} tiles from {len(self.index.sources)} raster(s), "
            f"encoder {encoder.get('name', '?')}."
        )
        self._store_state()

    def locate_index(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Locate the Lookalike index folder")
        if folder:
            self.open_index(folder)

    # -- project -------------------------------------------------------------------------------

    def _store_state(self) -> None:
        if self._restoring:
            return
        layer = self.raster_combo.currentLayer()
        state = project_state.DockState(
            index_folder=str(self.index.folder) if self.index is not None else self.index_folder.filePath(),
            raster_layer_id=layer.id() if layer is not None else "",
            encoder_path=self.encoder_path(),
            gsd=self.gsd_spin.value(),
            overlap_percent=self.overlap_spin.value(),
            extent_mode=self.extent_combo.currentData() or "",
            k=self.k_spin.value(),
        )
        project_state.write_state(state, self.project)

    def restore_from_project(self) -> None:
        state = project_state.read_state(self.project)
        if not state.index_folder and not state.raster_layer_id:
            return
        self._restoring = True
        try:
            layer = self.project.mapLayer(state.raster_layer_id) if state.raster_layer_id else None
            if layer is not None:
                self.raster_combo.setLayer(layer)
            if state.encoder_path:
                position = self.encoder_combo.findData(state.encoder_path)
                if position >= 0:
                    self.encoder_combo.setCurrentIndex(position)
                else:
                    self.encoder_combo.setCurrentIndex(self.encoder_combo.findData(OTHER_ENCODER))
                    self.encoder_file.setFilePath(state.encoder_path)
            if state.gsd > 0:
                self.gsd_spin.setValue(state.gsd)
            if state.overlap_percent > 0:
                self.overlap_spin.setValue(state.overlap_percent)
            position = self.extent_combo.findData(state.extent_mode)
            if position >= 0:
                self.extent_combo.setCurrentIndex(position)
            if state.k > 0:
                self.k_spin.setValue(state.k)
            self.index_folder.setFilePath(state.index_folder)
        finally:
            self._restoring = False
        if state.index_folder:
            self.open_index(state.index_folder)

    def _on_project_read(self, *_args) -> None:
        self.restore_from_project()

    def _on_project_cleared(self) -> None:
        self.clear_query()
        self.index = None
        self.matches = []
        self.result_layer_id = ""
        self.results_table.set_matches([])
        self.histogram.set_scores([])
        self.status_label.setText("No index open.")

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
        crs_wkt = crs_to_wkt(self.canvas.mapSettings().destinationCrs())
        self._add_query_part(geometry, negative, crs_wkt)
        self.start_search()

    def _add_query_part(self, geometry: QgsGeometry, negative: bool, crs_wkt: str) -> None:
        if not self.query_parts:
            self.query_number += 1
        self.query_parts.append((QgsGeometry(geometry), negative, crs_wkt))
        self.overlay.add(geometry, negative)
        self._update_query_label()

    def add_selected_features(self) -> None:
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
        for feature in layer.getFeatures(QgsFeatureRequest().setFilterFids(layer.selectedFeatureIds())):
            if not feature.hasGeometry():
                continue
            geometry = QgsGeometry(feature.geometry())
            geometry.transform(transform)
            self._add_query_part(geometry, negative, crs_to_wkt(canvas_crs))
        self.start_search()

    def clear_query(self) -> None:
        """Remove the drawn parts and the relevance marks; the next drawing starts a new query."""
        self.query_parts = []
        self.overlay.clear()
        self.results_table.clear_marks()
        self._update_query_label()

    def _update_query_label(self) -> None:
        positives = sum(1 for _geometry, negative, _crs in self.query_parts if not negative)
        negatives = len(self.query_parts) - positives
        if not self.query_parts:
            self.query_label.setText("Draw on the map to search.")
            return
        self.query_label.setText(f"Query {self.query_number}: {positives} positive, {negatives} negative part(s).")

    def query_layer_name(self) -> str:
        return f"Lookalike query {self.query_number}"

    # -- search --------------------------------------------------------------------------------

    def start_search(self) -> Optional[LookalikeTask]:
        if self.index is None:
            self.push_message(
                "No index is open; build an index or choose an index folder first.", Qgis.MessageLevel.Warning
            )
            return None
        relevant = tuple(self.results_table.tiles_marked(Relevance.RELEVANT))
        not_relevant = tuple(self.results_table.tiles_marked(Relevance.NOT_RELEVANT))
        if not self.query_parts and not relevant:
            self.push_message("Draw a query on the map first (rectangle, polygon or point).", Qgis.MessageLevel.Info)
            return None

        if self.search_task is not None:
            # One search at a time; the latest query runs when the current one ends.
            self._search_again = True
            return None

        encoder_path = jobs.encoder_path_for_index(self.index, self.encoder_path())
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
            encoder_path=encoder_path,
            relevant_tile_ids=relevant,
            not_relevant_tile_ids=not_relevant,
        )

        task = LookalikeTask(
            f"Lookalike: search {self.query_layer_name()}",
            lambda running: jobs.search_work(request, running),
            self._on_search_finished,
        )
        self.search_task = task
        self.search_button.setEnabled(False)
        self.query_label.setText("Searching…")
        self._store_state()
        return self._start_task(task)

    def _on_search_finished(self, task: LookalikeTask) -> None:
        self.search_task = None
        self.search_button.setEnabled(True)
        self._update_query_label()
        if task.outcome is TaskOutcome.SUCCEEDED:
            outcome: jobs.SearchOutcome = task.result
            self._encoder_cache = outcome.encoder
            self.show_matches(outcome.matches, outcome.encoder.name)
        elif task.outcome is TaskOutcome.FAILED:
            self._report_failure("The search", task)
        if self._search_again:
            self._search_again = False
            self.start_search()

    def show_matches(self, found: list, encoder_name: str) -> None:
        """Replace this query's result layer, table and histogram with ``found``."""
        self.matches = found
        name = self.query_layer_name()
        old_layer = self.project.mapLayer(self.result_layer_id) if self.result_layer_id else None
        if old_layer is not None and old_layer.name() == name:
            self.project.removeMapLayer(old_layer.id())
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
        self.project.addMapLayer(layer)
        self.result_layer_id = layer.id()

        self.results_table.set_matches(found)
        scores = [match.score for match in found]
        self.histogram.set_scores(scores)
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(0)
        self.threshold_slider.blockSignals(False)
        self._on_threshold_changed(0)
        if not found:
            self.push_message("The search found no matches; draw a different query or lower the threshold.")
        self._load_thumbnails(found)

    def result_layer(self) -> Optional[QgsVectorLayer]:
        layer = self.project.mapLayer(self.result_layer_id) if self.result_layer_id else None
        return layer if isinstance(layer, QgsVectorLayer) else None

    def score_threshold(self) -> float:
        low, high = self.histogram.score_range()
        return low + (high - low) * self.threshold_slider.value() / THRESHOLD_STEPS

    def _on_threshold_changed(self, _value: int) -> None:
        if not self.matches:
            self.threshold_label.setText("–")
            self.histogram.set_threshold(None)
            return
        threshold = self.score_threshold()
        # At the slider's start every match is shown, whatever rounding the range has.
        if self.threshold_slider.value() == 0:
            threshold = min(match.score for match in self.matches)
        shown = self.results_table.apply_score_threshold(threshold)
        self.histogram.set_threshold(threshold)
        self.threshold_label.setText(f"≥ {threshold:.3f} ({shown} shown)")
        layer = self.result_layer()
        if layer is not None:
            apply_score_threshold(layer, threshold)

    # -- results -------------------------------------------------------------------------------

    def _load_thumbnails(self, found: list) -> None:
        if not found or self.index is None:
            return
        sources = self.index.sources
        task = LookalikeTask(
            "Lookalike: read match thumbnails",
            lambda running: jobs.thumbnails_work(found, sources, running),
            self._on_thumbnails_loaded,
        )
        self._start_task(task)

    def _on_thumbnails_loaded(self, task: LookalikeTask) -> None:
        if task.outcome is not TaskOutcome.SUCCEEDED:
            if task.outcome is TaskOutcome.FAILED:
                LOGGER.warning("Reading thumbnails failed: %s", task.error)
            return
        for tile_id, image in task.result.items():
            self.results_table.set_thumbnail(tile_id, image)

    def match_geometry(self, tile_id: int) -> Optional[QgsGeometry]:
        layer = self.result_layer()
        if layer is None:
            return None
        request = QgsFeatureRequest().setFilterExpression(f'"{match_layers.FIELD_TILE_ID}" = {int(tile_id)}')
        # The subset string may hide the feature; it still exists in the provider.
        for feature in layer.dataProvider().getFeatures(request):
            return QgsGeometry(feature.geometry())
        return None

    def zoom_to_match(self, tile_id: int) -> None:
        """Centre the map on a match and flash its footprint."""
        layer = self.result_layer()
        geometry = self.match_geometry(tile_id)
        if layer is None or geometry is None:
            return
        transform = QgsCoordinateTransform(layer.crs(), self.canvas.mapSettings().destinationCrs(), self.project)
        centre = transform.transform(geometry.centroid().asPoint())
        self.canvas.setCenter(centre)
        self.canvas.refresh()
        self.canvas.flashGeometries([geometry], layer.crs())

    def mark_selected(self, relevance: Relevance) -> None:
        tile_ids = self.results_table.selected_tile_ids()
        if not tile_ids:
            self.push_message("Select result rows to mark them.", Qgis.MessageLevel.Info)
            return
        for tile_id in tile_ids:
            self.results_table.set_relevance(tile_id, relevance)

    # -- export --------------------------------------------------------------------------------

    def export_layer_with_dialog(self) -> None:
        layer = self.result_layer()
        if layer is None:
            self.push_message("There is no result layer to export; run a search first.", Qgis.MessageLevel.Info)
            return
        format_name = self.export_format_combo.currentText()
        _driver, extension = EXPORT_FORMATS[format_name]
        # The file dialog requests confirmation before replacing an existing file.
        path, _filter = QFileDialog.getSaveFileName(
            self, "Export the result layer", f"{layer.name()}.{extension}", f"{format_name} (*.{extension})"
        )
        if path:
            if not path.lower().endswith(f".{extension}"):
                path = f"{path}.{extension}"
            self.export_layer(path, format_name, overwrite=True)

    def export_layer(self, path: str, format_name: str = "GeoPackage", overwrite: bool = False) -> Optional[Path]:
        """Write the current result layer with QGIS's vector writer; returns the path or None on failure."""
        layer = self.result_layer()
        if layer is None:
            self.push_message("There is no result layer to export; run a search first.", Qgis.MessageLevel.Info)
            return None
        driver, _extension = EXPORT_FORMATS[format_name]
        try:
            written = match_layers.write_matches(layer, path, overwrite=overwrite, driver_name=driver)
        except LookalikeError as error:
            self.push_message(str(error), Qgis.MessageLevel.Critical)
            return None
        self.push_message(f"Exported {layer.featureCount()} matches to {written}.", Qgis.MessageLevel.Success)
        return written

    def export_chips_with_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the chips and labels.csv")
        if not folder:
            return
        if any(Path(folder).iterdir()):
            answer = QMessageBox.question(
                self,
                MESSAGE_TITLE,
                f"{folder} is not empty. Chips and labels.csv there will be replaced. Continue?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No,
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        self.export_chips(folder, self.chip_format_combo.currentText())

    def export_chips(self, folder: str, format_name: str = "GeoTIFF") -> Optional[LookalikeTask]:
        """Write chips of the selected (else all shown) matches in a task; labels are the relevance marks."""
        from ..gis.chip_export import chip_requests_from_layer, export_chips

        layer = self.result_layer()
        if layer is None:
            self.push_message("There is no result layer to export; run a search first.", Qgis.MessageLevel.Info)
            return None
        tile_ids = self.results_table.selected_tile_ids() or [
            match.tile_id for match in self.matches if match.score >= self.score_threshold()
        ]
        feature_ids = []
        label_by_feature = {}
        for feature in layer.dataProvider().getFeatures():
            tile_id = int(feature[match_layers.FIELD_TILE_ID])
            if tile_id in tile_ids:
                feature_ids.append(feature.id())
                label_by_feature[feature.id()] = self.results_table.relevance(tile_id).value
        try:
            requests = chip_requests_from_layer(layer, feature_ids=feature_ids)
        except LookalikeError as error:
            self.push_message(str(error), Qgis.MessageLevel.Critical)
            return None
        requests = [replace(request, label=label_by_feature.get(request.feature_id, "")) for request in requests]
        image_format = CHIP_FORMATS[format_name]

        def work(running: LookalikeTask):
            return export_chips(
                requests,
                folder,
                image_format=image_format,
                progress=lambda done, total: running.setProgress(100.0 * done / max(total, 1)),
                is_cancelled=running.isCanceled,
            )

        task = LookalikeTask(f"Lookalike: export {len(requests)} chips", work, self._on_chips_exported)
        return self._start_task(task)

    def _on_chips_exported(self, task: LookalikeTask) -> None:
        if task.outcome is TaskOutcome.SUCCEEDED:
            report = task.result
            skipped = f"; {len(report.skipped)} without valid pixels were skipped" if report.skipped else ""
            self.push_message(
                f"Exported {report.written_count} chips and {report.csv_path.name} to {report.folder}{skipped}.",
                Qgis.MessageLevel.Success,
            )
        elif task.outcome is TaskOutcome.FAILED:
            self._report_failure("Exporting chips", task)

    # -- life cycle ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Cancel running tasks, remove the map tools and rubber bands, and disconnect from the project."""
        for task in self.running_tasks():
            task.on_finished = None
            task.cancel()
        self._tasks.clear()
        for tool in self.map_tools.values():
            if self.canvas.mapTool() is tool:
                self.canvas.unsetMapTool(tool)
            tool.reset_preview()
        self.overlay.clear()
        for signal, slot in (
            (self.project.readProject, self._on_project_read),
            (self.project.cleared, self._on_project_cleared),
            (self.canvas.mapToolSet, self._on_map_tool_set),
        ):
            try:
                signal.disconnect(slot)
            except TypeError:
                LOGGER.debug("%s was not connected", slot.__name__)


def default_gsd_m(layer: QgsRasterLayer, canvas) -> float:
    """Return the layer's native pixel size in metres, or the map view's for tile services."""
    provider = layer.dataProvider()
    if provider.capabilities() & QgsRasterDataProvider.Size and layer.width() > 0:
        size = (layer.rasterUnitsPerPixelX() + layer.rasterUnitsPerPixelY()) / 2.0
        if layer.crs().isGeographic():
            centre_latitude = layer.extent().center().y()
            from math import cos, radians

            size *= METRES_PER_DEGREE * max(cos(radians(centre_latitude)), 0.01)
        return size
    return canvas.mapUnitsPerPixel() if not canvas.mapSettings().destinationCrs().isGeographic() else 1.0

