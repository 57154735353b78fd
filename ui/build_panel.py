"""The index group of the Lookalike dock: encoder, raster layer, extent, tile size, build and index folder."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsGeometry,
    QgsMapLayer,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox, QgsMessageBarItem, QgsRasterBandComboBox
from qgis.PyQt import sip
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core import get_logger
from ..core.crs import grid_scale
from ..core.encoder import MODELS_DIR, OnnxEncoder, default_model_path
from ..core.errors import LookalikeError, OtherBuildCheckpointsError
from ..core.grid import TileGrid, stride_from_overlap, tile_count
from ..core.index import (
    FOLDER_DAMAGED_INDEX,
    FOLDER_FOREIGN,
    FOLDER_INDEX,
    MANIFEST_NAME,
    TileIndex,
    first_grid_in,
    index_folder_state,
    read_manifest_json,
)
from ..core.parameters import (
    MAX_OVERLAP_PERCENT,
    MIN_DEFAULT_TILE_SIZE_SOURCE_PX,
    MIN_SOURCE_PIXELS_PER_TILE,
    MIN_TILE_SIZE_SOURCE_PX,
    PathLike,
)
from ..core.pipeline import (
    BuildParameters,
    Region,
    describe_skipped,
    discarded_checkpoints_warning,
    partial_folder_for,
)
from ..core.spec import ModelSpec
from ..gis.compat import RASTER_SIZE_CAPABILITY
from ..gis.raster_layers import crs_to_wkt, source_spec_for_layer, target_crs_wkt, written_raster_path
from ..gis.tasks import LookalikeTask, TaskOutcome, TileProgress
from . import jobs
from .compat import POLYGON_LAYER_FILTER, RASTER_LAYER_FILTER
from .dock_constants import (
    DEFAULT_OVERLAP_PERCENT,
    EXTENT_LABELS,
    EXTENT_MAP_VIEW,
    EXTENT_POLYGONS,
    EXTENT_SELECTED,
    EXTENT_WHOLE_LAYER,
    METRES_PER_DEGREE,
    OTHER_ENCODER,
)
from .result_layer import restore_result_layers

LOGGER = get_logger("ui.build_panel")

# Decimals of the GSD field in m/px.
GSD_DECIMALS = 3

ADD_TO_INDEX_LABEL = "Add this raster to the existing index"
# Characters the band and encoder lists show at their narrowest. The open list shows whole names.
BAND_COMBO_MIN_CHARACTERS = 3
ENCODER_COMBO_MIN_CHARACTERS = 18
# Folder names in the status line are cut to this length. The tooltip shows the whole path.
STATUS_NAME_MAX_CHARACTERS = 32

# The dock rejects a GSD at which a raster's shorter side spans fewer encoder pixels than this,
# because the raster then shrinks to a speck in one chip. Below about 1.1 pixels the build embeds
# no tile (measured on the 692 x 332 px ships clip with the 32 px test encoder), so 2 leaves a margin.
MIN_RASTER_SPAN_ENCODER_PX = 2.0


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


@dataclass(frozen=True)
class RasterTiling:
    """A raster's size in metres and pixels, and the tile and stride of the encoder grid in encoder pixels.

    Its limits mirror those of the build: a tile spans at least ``MIN_TILE_SIZE_SOURCE_PX``
    raster pixels, and a raster gets at most one tile per ``MIN_SOURCE_PIXELS_PER_TILE`` pixels.
    """

    width_m: float
    height_m: float
    width_px: int
    height_px: int
    tile_size_px: int
    stride_px: int

    @property
    def pixel_size_m(self) -> float:
        # The geometric mean, as the build measures a raster's pixel size.
        return math.sqrt(self.width_m / self.width_px * self.height_m / self.height_px)

    @property
    def max_tile_count(self) -> int:
        return max(1, self.width_px * self.height_px // MIN_SOURCE_PIXELS_PER_TILE)

    def tile_count_at(self, gsd: float) -> int:
        """Return the tiles of a grid at ``gsd`` over the whole raster, counted as the build counts them."""
        tile_m = gsd * self.tile_size_px
        stride_m = gsd * self.stride_px
        return tile_count(self.height_m, tile_m, stride_m) * tile_count(self.width_m, tile_m, stride_m)

    def gsd_range(self, whole_layer: bool) -> Tuple[float, float]:
        """Return the finest and coarsest GSD in m/px that the raster can be indexed at.

        The finest is above the coarsest when no GSD works. The tile count limit applies only to a
        ``whole_layer`` extent.
        """
        min_gsd = MIN_TILE_SIZE_SOURCE_PX * self.pixel_size_m / self.tile_size_px
        max_gsd = min(self.width_m, self.height_m) / MIN_RASTER_SPAN_ENCODER_PX
        if not whole_layer or self.tile_count_at(min_gsd) <= self.max_tile_count:
            return min_gsd, max_gsd
        if self.tile_count_at(max_gsd) > self.max_tile_count:
            return math.inf, max_gsd
        # The tile count falls as the GSD grows, so bisection finds the finest GSD within the limit.
        low, high = min_gsd, max_gsd
        for _ in range(60):
            middle = (low + high) / 2.0
            if self.tile_count_at(middle) > self.max_tile_count:
                low = middle
            else:
                high = middle
        return high, max_gsd


class BuildPanelMixin:
    """Widgets and slots of the "Index a raster" group, mixed into ``LookalikeDockWidget``.

    The dock's ``__init__`` creates the shared state (``iface``, ``index``, ``_tasks``) that these methods use.
    """

    def _build_index_group(self) -> QGroupBox:
        group = QGroupBox("1 · Index a raster")
        form = QFormLayout(group)
        # In a narrow dock the labels go above their fields instead of widening the panel.
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)

        # True once the analyst typed a GSD (or a project restored one): choosing another raster
        # then keeps it. Choosing another encoder applies that encoder's suggestion again.
        self._gsd_chosen = False
        # Set while the panel itself changes the GSD, so that the change is not taken as the analyst's.
        self._setting_gsd = False
        # Per index folder (see _folder_key): the request of the build started last, which a
        # Resume button must match, and the message bar item of that folder's Resume button.
        self._latest_build_requests: Dict[str, jobs.BuildRequest] = {}
        self._resume_items: Dict[str, QgsMessageBarItem] = {}

        self.raster_combo = QgsMapLayerComboBox()
        self.raster_combo.setObjectName("lookalikeRasterLayer")
        self.raster_combo.setFilters(RASTER_LAYER_FILTER)
        self.raster_combo.layerChanged.connect(self._on_raster_layer_changed)
        form.addRow("Raster layer", self.raster_combo)
        self.band_row = QWidget()
        self.band_row.setObjectName("lookalikeBands")
        self.band_layout = QHBoxLayout(self.band_row)
        self.band_layout.setContentsMargins(0, 0, 0, 0)
        self.band_combos: List[QgsRasterBandComboBox] = []
        self._band_choice_to_restore = ""
        self._set_band_slots(["red", "green", "blue"])
        form.addRow("Bands", self.band_row)

        self.encoder_combo = QComboBox()
        self.encoder_combo.setObjectName("lookalikeEncoder")
        # The engine's default encoder comes first, so the panel starts with it as Processing does.
        bundled = sorted(MODELS_DIR.glob("*.onnx"), key=lambda path: (path != default_model_path(), path.name))
        for model_path in bundled:
            self.encoder_combo.addItem(f"{model_path.stem} (bundled)", str(model_path))
        self.encoder_combo.addItem("Other ONNX file…", OTHER_ENCODER)
        self.encoder_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.encoder_combo.setMinimumContentsLength(ENCODER_COMBO_MIN_CHARACTERS)
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
        self.gsd_spin.setDecimals(GSD_DECIMALS)
        self.gsd_spin.setRange(0.001, 100000.0)
        self.gsd_spin.setSuffix(" m/px")
        self.gsd_spin.setToolTip(
            "Ground sample distance of the chips the encoder sees, in metres per encoder pixel"
        )
        self.gsd_spin.valueChanged.connect(self._update_tile_size_label)
        self.gsd_spin.valueChanged.connect(self._on_gsd_changed)
        form.addRow("GSD", self.gsd_spin)
        self.tile_size_label = QLabel("–")
        form.addRow("Tile size", self.tile_size_label)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setObjectName("lookalikeOverlap")
        # The Processing algorithm's limit too, so that the field can show the overlap of any index.
        self.overlap_spin.setRange(0, MAX_OVERLAP_PERCENT)
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
        self.add_to_index_check = QCheckBox(ADD_TO_INDEX_LABEL)
        self.add_to_index_check.setObjectName("lookalikeAddToIndex")
        self.add_to_index_check.setToolTip("The added raster is tiled at the index's GSD, which the GSD field shows")
        self.add_to_index_check.toggled.connect(self._follow_index_grid)
        form.addRow(self.add_to_index_check)

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
        # No percentage until a build runs: "0%" beside an opened index read as a stalled build.
        self.progress_bar.setTextVisible(False)
        form.addRow(self.progress_bar)
        self.status_label = QLabel("No index open.")
        self.status_label.setObjectName("lookalikeIndexStatus")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        self._on_extent_mode_changed()
        return group

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
        self._encoder_failure = None
        if not self._restoring:
            # The analyst chose another encoder, whose suggested GSD then applies.
            self._gsd_chosen = False
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
            self._encoder_failure = str(task.error)
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
        if not self._restoring and not self._gsd_chosen:
            self._apply_suggested_gsd()
            self._follow_index_grid()
        if self._band_slot_names != list(spec.bands):
            self._set_band_slots(list(spec.bands))
        self._update_tile_size_label()

    def _update_tile_size_label(self, *_args) -> None:
        if self.encoder_spec is None:
            self.tile_size_label.setText("–")
            return
        size_px = self.encoder_spec.input_size_px
        ground_m = size_px * self.gsd_spin.value()
        text = f"{size_px} px × {self.gsd_spin.value():g} m = {ground_m:g} m"
        pixel_size_m = _native_pixel_size_m(self.raster_combo.currentLayer())
        if pixel_size_m:
            # How far the chips are upsampled or downsampled shows in the raster pixels a tile spans.
            text += f", {ground_m / pixel_size_m:.3g} raster px"
        self.tile_size_label.setText(text)

    def _on_gsd_changed(self, *_args) -> None:
        if not self._setting_gsd:
            self._gsd_chosen = True

    def _set_gsd(self, gsd_m: float) -> None:
        """Set the GSD field from the panel's own rules, not as the analyst's choice."""
        self._setting_gsd = True
        try:
            self.gsd_spin.setValue(gsd_m)
        finally:
            self._setting_gsd = False

    def _apply_suggested_gsd(self) -> None:
        layer = self.raster_combo.currentLayer()
        if isinstance(layer, QgsRasterLayer) and layer.isValid():
            self._set_gsd(suggested_gsd_m(layer, self.canvas, self.encoder_spec))
        elif self.encoder_spec is not None and self.encoder_spec.gsd_m:
            self._set_gsd(self.encoder_spec.gsd_m)

    # -- raster, bands and extent -------------------------------------------------------------

    def _set_band_slots(self, encoder_bands: List[str]) -> None:
        """Show one band chooser per encoder input band, each starting at "auto"."""
        for combo in self.band_combos:
            self.band_layout.removeWidget(combo)
            combo.deleteLater()
        self.band_combos = []
        self._band_slot_names = list(encoder_bands)
        for band in encoder_bands:
            combo = QgsRasterBandComboBox()
            # Band names are long, and three lists side by side would otherwise set the panel's width.
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(BAND_COMBO_MIN_CHARACTERS)
            combo.setShowNotSetOption(True, f"{band}: auto")
            combo.setToolTip(
                f"Raster band fed to the encoder's {band} input; auto picks it from the colour interpretation"
            )
            self.band_layout.addWidget(combo)
            self.band_combos.append(combo)
        self._update_band_combos(self.raster_combo.currentLayer())
        self.restore_band_choice(self._band_choice_to_restore)

    def restore_band_choice(self, text: str) -> None:
        """Choose the bands stored as ``"4,1,2"``.

        A choice for another number of inputs than the current encoder's waits for the next
        encoder to load.
        """
        bands = [int(value) for value in text.split(",") if value.strip().isdigit()]
        if len(bands) != len(self.band_combos):
            # The encoder that loads later may take this many bands.
            self._band_choice_to_restore = text
            return
        self._band_choice_to_restore = ""
        for combo, band in zip(self.band_combos, bands):
            combo.setBand(band)

    def _update_band_combos(self, layer: Optional[QgsMapLayer]) -> None:
        # Other layers are first written to a GeoTIFF whose bands need not be numbered like the
        # layer's (an XYZ layer's one colour band becomes three), so only GDAL rasters get a choice.
        is_gdal_raster = isinstance(layer, QgsRasterLayer) and layer.providerType() == "gdal"
        for combo in self.band_combos:
            combo.setLayer(layer if is_gdal_raster else None)
            combo.setEnabled(is_gdal_raster)

    def band_indexes(self) -> Optional[Tuple[int, ...]]:
        """Return the chosen source band per encoder band, or None to pick them from the colour interpretation."""
        bands = [combo.currentBand() for combo in self.band_combos if combo.isEnabled()]
        chosen = [band for band in bands if band > 0]
        encoder_bands = [band.lower() for band in self.encoder_spec.bands] if self.encoder_spec else []
        if not chosen and bands and encoder_bands != ["red", "green", "blue"]:
            # Auto picks red, green and blue, which only an RGB encoder takes.
            raise LookalikeError(
                f"The encoder takes the bands {', '.join(self.encoder_spec.bands)}, which auto cannot pick; choose "
                "a raster band for each in the Bands row."
            )
        if not chosen:
            return None
        if len(chosen) != len(self.band_combos):
            raise LookalikeError(
                f"Bands are chosen for {len(chosen)} of the encoder's {len(self.band_combos)} input bands; choose "
                "a raster band for each, or set them all to auto."
            )
        return tuple(chosen)

    def _band_choice_or_none(self) -> Optional[Tuple[int, ...]]:
        """Return :meth:`band_indexes`, or None where the choice is incomplete (a build reports that)."""
        try:
            return self.band_indexes()
        except LookalikeError:
            return None

    def _on_raster_layer_changed(self, layer: Optional[QgsMapLayer]) -> None:
        self._update_band_combos(layer)
        # Band numbers chosen for another raster mean other bands here, so each starts at auto.
        for combo in self.band_combos:
            combo.setBand(-1)
        if not self._restoring:
            self._band_choice_to_restore = ""
        if self._restoring or not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            return
        if not self._gsd_chosen:
            self._apply_suggested_gsd()
        self._update_tile_size_label()
        self._follow_index_grid()

    def _follow_index_grid(self, *_args) -> None:
        """Show the index's GSD and overlap, fixed, while a raster is to be added: an index has one grid.

        The values the analyst had set come back when the box is unchecked.
        """
        adding = self.add_to_index_check.isChecked()
        index_grid = self._grid_to_add_to() if adding else None
        following = index_grid is not None
        self.gsd_spin.setEnabled(not following)
        self.overlap_spin.setEnabled(not following)
        if not following:
            if self._own_grid_values is not None:
                gsd_m, overlap_percent = self._own_grid_values
                self._own_grid_values = None
                self._set_gsd(gsd_m)
                self.overlap_spin.setValue(overlap_percent)
            return
        if self._own_grid_values is None:
            self._own_grid_values = (self.gsd_spin.value(), self.overlap_spin.value())
        self._set_gsd(index_grid.gsd_m)
        self.overlap_spin.setValue(round(100.0 * index_grid.overlap_fraction))

    def _grid_to_add_to(self) -> Optional[TileGrid]:
        """Return the grid of the index in the folder field, from the open index when it is that one."""
        folder = self.index_folder.filePath()
        index_is_open = self.index is not None and bool(self.index.sources) and bool(folder)
        if index_is_open and _folder_key(str(self.index.folder)) == _folder_key(folder):
            # The open index already has the grid, so its manifest is not read again.
            return TileGrid.from_dict(self.index.sources[0]["grid"])
        return _index_grid_in(folder)

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
            canvas_crs = self.canvas.mapSettings().destinationCrs()
            self._check_map_view_covers_raster(extent, canvas_crs)
            crs_wkt = crs_to_wkt(canvas_crs)
            bounds = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
            return Region(crs_wkt=crs_wkt, bounds=bounds), (bounds, crs_wkt)
        wkts, layer = self._extent_polygons()
        crs_wkt = crs_to_wkt(layer.crs())
        envelope = QgsGeometry.unaryUnion([QgsGeometry.fromWkt(wkt) for wkt in wkts]).boundingBox()
        bounds = (envelope.xMinimum(), envelope.yMinimum(), envelope.xMaximum(), envelope.yMaximum())
        return Region(crs_wkt=crs_wkt, polygons_wkt=tuple(wkts)), (bounds, crs_wkt)

    def _check_map_view_covers_raster(self, extent: QgsRectangle, canvas_crs: QgsCoordinateReferenceSystem) -> None:
        """Raise LookalikeError when the map view lies beside the chosen raster, where the build would find no tile."""
        layer = self.raster_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            return
        try:
            view = QgsCoordinateTransform(canvas_crs, layer.crs(), self.project).transformBoundingBox(extent)
        except QgsCsException:
            # The view cannot be brought into the raster's CRS here; the build names that case.
            return
        if not view.intersects(layer.extent()):
            raise LookalikeError(
                f"The map view does not cover the raster {layer.name()!r}, so the build would find no tile; pan or "
                "zoom the map to the raster, or set the extent to Whole layer."
            )

    def _mask_region(self) -> Optional[Region]:
        layer = self.mask_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer):
            return None
        wkts = [feature.geometry().asWkt() for feature in layer.getFeatures() if feature.hasGeometry()]
        if not wkts:
            self.push_message(
                f"The mask layer {layer.name()!r} has no polygons, so this build masks nothing; draw the areas to "
                "leave out in it, or set the mask to none.",
                Qgis.MessageLevel.Warning,
            )
            return None
        return Region(crs_wkt=crs_to_wkt(layer.crs()), polygons_wkt=tuple(wkts))

    def _check_gsd(self, layer: QgsRasterLayer, gsd: float, whole_layer: bool) -> None:
        """Raise LookalikeError naming the GSD range for ``layer`` when the build would reject ``gsd``.

        The tile count is checked for a whole-layer extent only, because a smaller extent has fewer tiles.
        """
        # NOTE: the build measures a geographic raster in a UTM grid, which raster_size_m() only
        # approximates, so at the very edges of the range its limits may differ slightly from these.
        size_m = raster_size_m(layer)
        if size_m is None or layer.width() <= 0 or layer.height() <= 0:
            return
        overlap_percent = self.overlap_spin.value()
        tile_size_px = self.encoder_spec.input_size_px
        tiling = RasterTiling(
            width_m=size_m[0],
            height_m=size_m[1],
            width_px=layer.width(),
            height_px=layer.height(),
            tile_size_px=tile_size_px,
            stride_px=stride_from_overlap(tile_size_px, overlap_fraction=overlap_percent / 100.0),
        )
        min_gsd, max_gsd = tiling.gsd_range(whole_layer)
        name = layer.name()
        settings = f"{tile_size_px} px tiles and {overlap_percent} % overlap"
        if min_gsd > max_gsd:
            raise LookalikeError(
                f"Layer {name!r} ({tiling.width_px} × {tiling.height_px} px) is too small to index with {settings} "
                "at any GSD; lower the overlap or choose a larger raster."
            )

        fix = ""
        tile_span_px = gsd * tile_size_px / tiling.pixel_size_m
        if tile_span_px < MIN_TILE_SIZE_SOURCE_PX:
            reason = (
                f"a tile would span only {tile_span_px:.3g} raster pixels, and a tile needs at least "
                f"{MIN_TILE_SIZE_SOURCE_PX:g}"
            )
        elif whole_layer and tiling.tile_count_at(gsd) > tiling.max_tile_count:
            reason = (
                f"its {tiling.width_px} × {tiling.height_px} pixels would get {tiling.tile_count_at(gsd)} tiles "
                f"that read the same pixels many times, and at most one tile per {MIN_SOURCE_PIXELS_PER_TILE} "
                "pixels is allowed"
            )
            fix = ", or lower the overlap"
        elif gsd > max_gsd:
            reason = (
                f"its shorter side of {min(size_m):.4g} m would span fewer than {MIN_RASTER_SPAN_ENCODER_PX:g} "
                "encoder pixels, too few to embed"
            )
        else:
            return
        # Rounded inwards to the GSD field's 3 decimals, so that typing a bound builds.
        step = 10.0 ** GSD_DECIMALS
        lowest = math.ceil(min_gsd * step - 1e-6) / step
        highest = math.floor(max_gsd * step + 1e-6) / step
        gsd_range = f"between {_format_gsd(lowest)} and {_format_gsd(highest)} m/px"
        if not self.gsd_spin.isEnabled():
            # The GSD is the index's, fixed while the raster is added to it.
            raise LookalikeError(
                f"Layer {name!r} cannot be added to the index, whose GSD is {gsd:g} m/px with {settings}, "
                f"because {reason}. Uncheck '{ADD_TO_INDEX_LABEL}' to build a separate index for this layer, "
                f"at a GSD {gsd_range}."
            )
        raise LookalikeError(
            f"GSD {gsd:g} m/px does not work for layer {name!r} with {settings}, because {reason}. "
            f"Set the GSD {gsd_range}{fix}."
        )

    # -- build ---------------------------------------------------------------------------------

    def prepare_build(self) -> jobs.BuildRequest:
        """Gather the build settings into a request; raises LookalikeError naming what is missing."""
        layer = self.raster_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise LookalikeError("No raster layer is chosen; add a raster to the project and choose it.")
        folder = self.index_folder.filePath().strip()
        if not folder:
            raise LookalikeError("No index folder is set; choose a folder to write the index to.")
        if not Path(folder).is_absolute():
            absolute = self._absolute_index_folder(folder)
            if absolute is None:
                raise LookalikeError(
                    f"The index folder {folder!r} is a relative path and the project has no folder yet; choose a "
                    "full path with the … button, or save the project first."
                )
            folder = absolute
            self.index_folder.setFilePath(folder)
        check_index_folder(Path(folder))
        if self.add_to_index_check.isChecked() and _readable_folder_state(Path(folder)) not in (
            FOLDER_INDEX, FOLDER_DAMAGED_INDEX
        ):
            raise LookalikeError(
                f"{folder} contains no Lookalike index to add this raster to; choose the index's folder, or "
                f"uncheck '{ADD_TO_INDEX_LABEL}' to build a new index there."
            )
        encoder_path = self.encoder_path()
        if not encoder_path or not Path(encoder_path).is_file():
            raise LookalikeError(f"The encoder file {encoder_path or '(none)'} is missing; choose an ONNX model.")
        if self.encoder_spec is None and self._encoder_failure:
            raise LookalikeError(f"The encoder cannot be used: {self._encoder_failure}")
        if self.encoder_spec is None:
            raise LookalikeError("The encoder is still loading; build again in a moment.")

        source = source_spec_for_layer(layer)
        region, bounds_and_crs = self.build_region()
        gsd = self.gsd_spin.value()
        provider_bounds = None
        provider_bounds_crs = ""
        if source.uses_gdal:
            # Other sources are written at the GSD itself, so only a GDAL raster's own pixel size
            # limits the GSD.
            self._check_gsd(layer, gsd, whole_layer=bounds_and_crs is None)
            source_paths = (source.gdal_path,)
        else:
            if bounds_and_crs is None:
                if not layer.dataProvider().capabilities() & RASTER_SIZE_CAPABILITY:
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

        add_to_existing = self.add_to_index_check.isChecked()
        overlap_fraction = self.overlap_spin.value() / 100.0
        index_grid = _index_grid_in(folder) if add_to_existing else None
        if index_grid is not None:
            # The overlap field shows whole percent, which may not give the index's stride exactly.
            overlap_fraction = index_grid.overlap_fraction
        params = BuildParameters(
            source_paths=source_paths,
            index_folder=folder,
            encoder_path=encoder_path,
            # Added rasters take the index's GSD, which the GSD field may show only rounded.
            tile_ground_size_m=None if add_to_existing and _matches_index_gsd(folder, gsd) else (
                gsd * self.encoder_spec.input_size_px
            ),
            overlap_fraction=overlap_fraction,
            extent=region,
            mask=self._mask_region(),
            band_indexes=self.band_indexes(),
            add_to_existing=add_to_existing,
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
        folder = request.params.index_folder
        request = self._confirm_replace(
            request, f"{folder} already contains an index. Replace it with a new index of this raster?"
        )
        if request is None:
            return None
        return self.run_build(request)

    def _confirm_replace(self, request: jobs.BuildRequest, question: str) -> Optional[jobs.BuildRequest]:
        """Ask ``question`` when the build would replace the index in its folder.

        Returns the request, allowed to replace that index when the analyst agreed, or None when
        they declined.
        """
        state = _readable_folder_state(Path(request.params.index_folder))
        if request.params.add_to_existing or state not in (FOLDER_INDEX, FOLDER_DAMAGED_INDEX):
            return request
        if not self._confirmed(question):
            return None
        return replace(request, params=replace(request.params, overwrite_existing_index=True))

    def run_build(self, request: jobs.BuildRequest) -> LookalikeTask:
        """Start a build task; rerunning a cancelled request resumes it from its checkpoints."""
        self.last_build_request = request
        folder_key = _folder_key(request.params.index_folder)
        self._latest_build_requests[folder_key] = request
        # An older Resume of this folder would undo this build.
        self._remove_resume_message(folder_key)
        if self.index is not None and Path(self.index.folder) == Path(request.params.index_folder):
            # The build replaces the files of the open index.
            self.index = None
        task = LookalikeTask(
            f"Lookalike: index {request.source.layer_name}",
            lambda running: jobs.build_work(request, running),
            self._on_build_finished,
        )
        task.project_epoch = self.project_epoch
        task.tileProgress.connect(self._on_build_progress)
        task.progressChanged.connect(self._on_build_percent)
        self.build_task = task
        self.build_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.status_label.setText(f"Building the index of {request.source.layer_name}…")
        self._start_task(task)
        return task

    def cancel_build(self) -> None:
        if self.build_task is not None:
            self.build_task.cancel()
            self.status_label.setText("Cancelling after the current batch…")

    def _on_build_percent(self, percent: float) -> None:
        self.progress_bar.setValue(int(percent))

    def detach_build_task(self) -> None:
        """Disconnect the running build from the panel and drop its Resume messages, before the panel goes away."""
        task = self.build_task
        if task is not None:
            for signal, slot in ((task.tileProgress, self._on_build_progress),
                                 (task.progressChanged, self._on_build_percent)):
                try:
                    signal.disconnect(slot)
                except TypeError:
                    LOGGER.debug("%s was not connected", slot.__name__)
        for folder_key in list(self._resume_items):
            self._remove_resume_message(folder_key)

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
            if _started_in_closed_project(self, task):
                self._on_closed_project_build_finished(report.index_folder)
                return
            self.open_index(report.index_folder)
            if report.already_complete and not report.tiles_resumed:
                self.push_message(
                    f"The index in {report.index_folder} already contains this build (the same rasters and "
                    f"settings), so nothing was embedded or added; its {_tile_count_text(report.tiles_embedded)} "
                    "from these rasters stay as they were. Draw on the map to search.",
                    Qgis.MessageLevel.Info,
                )
                for warning in report.warnings:
                    self.push_message(warning, Qgis.MessageLevel.Warning)
                return
            skipped = (f", {report.tiles_skipped} skipped ({describe_skipped(report.skipped_by_reason)})"
                       if report.tiles_skipped else "")
            # After a resume the time covers this run only, so the message names where it started.
            resumed = (f" (resumed at tile {report.tiles_resumed} of {report.tiles_total})"
                       if report.tiles_resumed and not report.already_complete else "")
            action, index_size = "Index built", ""
            if request is not None and request.params.add_to_existing:
                total = (read_manifest_json(Path(report.index_folder) / MANIFEST_NAME) or {}).get("tile_count")
                action = "Added to the index"
                index_size = f"; the index now holds {_tile_count_text(total)}" if isinstance(total, int) else ""
            self.push_message(
                f"{action}{resumed}: {_tile_count_text(report.tiles_embedded)} embedded{skipped} in "
                f"{_format_duration(report.elapsed_s)}{index_size}. Draw on the map to search.",
                Qgis.MessageLevel.Success,
            )
            for warning in report.warnings:
                if warning != _chosen_discard_warning(request):
                    self.push_message(warning, Qgis.MessageLevel.Warning)
            return
        folder = request.params.index_folder if request is not None else ""
        if task.outcome is TaskOutcome.CANCELLED and _started_in_closed_project(self, task):
            # A Resume here would open the closed project's index in this one.
            self._show_index_status()
            self.push_message(
                f"The build of {folder} started in the project you closed was cancelled. Its finished tiles are "
                "kept: build that raster into that folder again with the same settings to continue.",
                Qgis.MessageLevel.Info,
            )
            return
        if task.outcome is TaskOutcome.CANCELLED:
            self._show_index_status()
            # The index open before the build stays open and searchable, and the line still names it.
            still_open = f" {self.status_label.text()}" if self.index is not None else ""
            self.status_label.setText(f"Build cancelled; Resume continues where it stopped.{still_open}")
            manifest_stamp = read_manifest_stamp(folder)
            self._resume_items[_folder_key(folder)] = self._push_with_button(
                f"The build of {folder} was cancelled. Its finished tiles are kept; click Resume to continue it "
                f"with the settings it started with ({_build_settings_text(request)}).",
                "Resume",
                lambda: self.resume_build(request, manifest_stamp),
                Qgis.MessageLevel.Info,
            )
            self._reopen_index_after_build(folder, task)
            return
        if (isinstance(task.error, OtherBuildCheckpointsError) and request is not None
                and not _started_in_closed_project(self, task)):
            self._reopen_index_after_build(folder, task)
            self._show_index_status()
            self._offer_to_discard_checkpoints(request, task.error)
            return
        self._report_failure("Building the index", task)
        self._reopen_index_after_build(folder, task)
        self._show_index_status()
        # The index open before the build stays open and searchable.
        self.status_label.setText(f"The build failed; see the message bar. {self.status_label.text()}")

    def _offer_to_discard_checkpoints(self, request: jobs.BuildRequest, error: OtherBuildCheckpointsError) -> None:
        """Ask before deleting the finished tiles of an interrupted build with other settings; build if agreed."""
        folder = request.params.index_folder
        covered = f" ({error.tiles_done} tiles)" if error.tiles_done else ""
        differences = f" It differs in {'; '.join(error.changes)}." if error.changes else ""
        question = (
            f"{error.partial_folder} contains the finished tiles{covered} of an interrupted build of {folder} with "
            f"other settings.{differences}\n\nDelete those tiles and build with the current settings? No keeps "
            "them: building with that build's settings finishes it."
        )
        if self._confirmed(question):
            self.run_build(replace(request, params=replace(request.params, discard_other_checkpoints=True)))
            return
        self.push_message(
            f"The build did not start, and the finished tiles in {error.partial_folder} are kept. Build with that "
            "build's settings to finish it, or choose another index folder.",
            Qgis.MessageLevel.Info,
        )

    def _on_closed_project_build_finished(self, folder: str) -> None:
        """Report a build started in a project since closed; reopen the open index if it came from that folder."""
        open_folder = str(self.index.folder) if self.index is not None else self._opening_index_folder
        if open_folder and _folder_key(open_folder) == _folder_key(folder):
            # The index this project opened (or is opening) from that folder was replaced on disk.
            self.index = None
            self.open_index(folder)
            self.push_message(
                f"The index in {folder} was rebuilt by a build started in the project you closed; it is open again "
                "with the new tiles.",
                Qgis.MessageLevel.Info,
            )
            return
        self._show_index_status()
        self.push_message(
            f"The index {folder} started in the project you closed is built; choose that folder under Index "
            "folder to open it here.",
            Qgis.MessageLevel.Success,
        )

    def _show_index_status(self) -> None:
        if self.index is None:
            self.status_label.setText("No index open.")
            self.status_label.setToolTip("")
            return
        encoder = self.index.encoder_info
        open_folder = Path(self.index.folder)
        text = (
            f"Index open: {self.index.count} tiles from {len(self.index.sources)} raster(s) in "
            f"{_short_name(open_folder.name)}, encoder {encoder.get('name', '?')}."
        )
        field_folder = self.index_folder.filePath().strip()
        if field_folder and _folder_key(field_folder) != _folder_key(str(open_folder)):
            # Searches go to the open index, whatever folder the field shows.
            text += f" Searches use it; the next build writes to {_short_name(Path(field_folder).name)}."
        self.status_label.setText(text)
        self.status_label.setToolTip(f"Open index: {open_folder}")

    def _reopen_index_after_build(self, folder: str, task: LookalikeTask) -> None:
        # A failed or cancelled build leaves the index that was there before, so it is searchable again.
        if _started_in_closed_project(self, task):
            return
        if self.index is None and folder and _readable_folder_state(Path(folder)) == FOLDER_INDEX:
            self.open_index(folder)

    def resume_build(
        self, request: jobs.BuildRequest, manifest_stamp: Optional[Tuple[int, int, int]]
    ) -> Optional[LookalikeTask]:
        """Rerun a cancelled build from its checkpoints when its Resume button is clicked.

        ``manifest_stamp`` is ``read_manifest_stamp()`` of the folder when the build was cancelled.
        A newer build of the same folder makes the request stale, because resuming would undo
        that build. An index that changed on disk since the cancel is confirmed again.
        """
        folder = request.params.index_folder
        if self._latest_build_requests.get(_folder_key(folder)) is not request:
            self.push_message(
                f"Resume did nothing because a newer build of {folder} was started after this one was cancelled. "
                "Click Build index to build with the current settings.",
                Qgis.MessageLevel.Warning,
            )
            return None
        if self.build_task is not None:
            self.push_message(
                f"Resume of {folder} did nothing because another build is running. When it ends, click "
                "Build index with the same settings to continue from the kept tiles.",
                Qgis.MessageLevel.Warning,
            )
            return None
        if read_manifest_stamp(folder) != manifest_stamp:
            try:
                check_index_folder(Path(folder))
            except LookalikeError as error:
                self.push_message(str(error), Qgis.MessageLevel.Warning)
                return None
            request = self._confirm_replace(
                request,
                f"The index in {folder} changed after this build was cancelled. Replace it with the resumed build?",
            )
            if request is None:
                return None
        if (abs(self.gsd_spin.value() - request.gsd) > 1e-9 * request.gsd
                or self.overlap_spin.value() != round(request.params.overlap_fraction * 100)
                or self.encoder_path() != request.params.encoder_path
                or self._band_choice_or_none() != request.params.band_indexes):
            self.push_message(
                f"Resuming {folder} with the settings the build started with ({_build_settings_text(request)}); "
                "the settings now in the fields apply to the next Build index.",
                Qgis.MessageLevel.Info,
            )
        return self.run_build(request)

    def _remove_resume_message(self, folder_key: str) -> None:
        item = self._resume_items.pop(folder_key, None)
        # The analyst may have closed the message, which deletes the item.
        if item is not None and not sip.isdeleted(item):
            self.iface.messageBar().popWidget(item)

    # -- index ---------------------------------------------------------------------------------

    def _absolute_index_folder(self, path: str) -> Optional[str]:
        """Return ``path`` as an absolute path, a relative one taken from the project's folder, or None without one.

        QGIS's working directory is no folder the analyst chose, so it never anchors a relative path.
        """
        if Path(path).is_absolute():
            return path
        home = self.project.homePath()
        return str(Path(home) / path) if home else None

    def _on_index_folder_changed(self, path: str) -> None:
        if self._restoring:
            return
        if path:
            path = self._absolute_index_folder(path) or ""
        self._follow_index_grid()
        if self.index is not None and not self._index_opening and self.build_task is None:
            # The status line names the index searches use when the field names another folder.
            self._show_index_status()
        if path and (Path(path) / MANIFEST_NAME).is_file():
            state = _readable_folder_state(Path(path))
            if state in (FOLDER_INDEX, FOLDER_DAMAGED_INDEX):
                self.open_index(path)
                return
            if state == FOLDER_FOREIGN:
                # Only another program's manifest is reported here, because this slot also runs for
                # every partial path typed into the field, and most of those folders contain other files.
                self.push_message(foreign_manifest_message(Path(path)), Qgis.MessageLevel.Warning)
        self._store_state()

    def open_index(self, folder: str) -> LookalikeTask:
        """Open the index in ``folder`` in a task, because the HNSW graph loads slower as it grows.

        A missing or damaged index gets a message-bar message with a Locate button.
        """
        self._opening_index_folder = str(folder)
        self._index_opening = True
        self.status_label.setText(f"Opening the index in {folder}…")
        def open_with_stamp(running: LookalikeTask) -> TileIndex:
            # Taken before the open, so that a save during it shows as a change at the next search.
            running.manifest_stamp = read_manifest_stamp(folder)
            return TileIndex.open(folder)

        task = LookalikeTask(
            f"Lookalike: open index {Path(folder).name}",
            open_with_stamp,
            lambda done: self._on_index_opened(str(folder), done),
            can_cancel=False,
        )
        return self._start_task(task)

    def _on_index_opened(self, folder: str, task: LookalikeTask) -> None:
        if folder != self._opening_index_folder:
            # The analyst chose another folder while this one was loading.
            return
        self._index_opening = False
        search_after_open, self._search_after_open = self._search_after_open, False
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
        self._opened_manifest_stamp = getattr(task, "manifest_stamp", None)
        self._follow_index_grid()
        restored = restore_result_layers(self.project, self.index, self.watch_result_layer)
        if restored.filled:
            LOGGER.info("Filled %d result layer(s) of the project from the index in %s", len(restored.filled), folder)
        for other_folder, names in restored.other_index_names.items():
            quoted = ", ".join(f"'{name}'" for name in names)
            self.push_message(
                f"The result layer(s) {quoted} came from the index in {other_folder}, so they stay empty while the "
                f"index in {folder} is open; choose that index folder to fill them again.",
                Qgis.MessageLevel.Info,
            )
        if restored.earlier_build_names:
            names = ", ".join(f"'{name}'" for name in restored.earlier_build_names)
            self.push_message(
                f"The result layer(s) {names} came from an earlier build of the index in {folder}, whose tiles "
                "may differ from this one's, so they stay empty; run their queries again.",
                Qgis.MessageLevel.Warning,
            )
        if self.index_folder.filePath() != folder:
            self._restoring, previous = True, self._restoring
            self.index_folder.setFilePath(folder)
            self._restoring = previous
        saved_query, self._saved_query = self._saved_query, None
        self.continue_saved_query(saved_query)
        self.set_results_of_other_index_aside()
        self.restore_marks_set_aside()
        self._show_index_status()
        self._store_state()
        if search_after_open:
            self.start_search()

    def locate_index(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Locate the Lookalike index folder")
        if folder:
            self.open_index(folder)


def raster_size_m(layer: QgsRasterLayer) -> Optional[Tuple[float, float]]:
    """Return the width and height of a raster layer's extent in metres, or None without a CRS.

    A geographic extent is converted at its centre latitude. A projected extent is converted
    with the CRS's unit and scale, as the build does (``core.crs.grid_scale``).
    """
    if not layer.crs().isValid():
        return None
    extent = layer.extent()
    width, height = extent.width(), extent.height()
    if layer.crs().isGeographic():
        latitude_scale = max(math.cos(math.radians(extent.center().y())), 0.01)
        width *= METRES_PER_DEGREE * latitude_scale
        height *= METRES_PER_DEGREE
        return width, height
    metres_per_unit = ground_metres_per_unit(layer)
    return width * metres_per_unit, height * metres_per_unit


def ground_metres_per_unit(layer: QgsRasterLayer) -> float:
    """Return the ground metres one CRS unit of a projected layer spans at its centre (feet, Web Mercator)."""
    extent = layer.extent()
    try:
        scale = grid_scale(crs_to_wkt(layer.crs()), (extent.xMinimum(), extent.yMinimum(),
                                                      extent.xMaximum(), extent.yMaximum()))
    except LookalikeError as error:
        LOGGER.info("Taking the CRS units of %s as metres: %s", layer.name(), error)
        return 1.0
    return 1.0 / scale.units_per_metre


def check_index_folder(folder: Path) -> None:
    """Raise LookalikeError when ``folder`` is a file or contains files other than a Lookalike index."""
    if folder.exists() and not folder.is_dir():
        raise LookalikeError(f"The index folder {folder} is a file; choose a folder for the index.")
    try:
        state = index_folder_state(folder)
    except OSError as error:
        raise LookalikeError(
            f"The index folder {folder} cannot be read ({error.strerror}); choose a folder you can read and write."
        ) from error
    if state != FOLDER_FOREIGN:
        return
    if (folder / MANIFEST_NAME).is_file():
        raise LookalikeError(foreign_manifest_message(folder))
    raise LookalikeError(
        f"The folder {folder} contains other files and no Lookalike index, so no index is written there. "
        "Choose an empty or new folder for the index."
    )


def foreign_manifest_message(folder: Path) -> str:
    return (
        f"The folder {folder} is not a Lookalike index because its {MANIFEST_NAME} belongs to another program, "
        "so no index is opened or written there. Choose an empty or new folder for the index, or the folder of "
        "an existing index."
    )


def _readable_folder_state(folder: Path) -> str:
    """Return ``index_folder_state(folder)``, or "" when the folder cannot be read."""
    try:
        return index_folder_state(folder)
    except OSError as error:
        LOGGER.warning("Cannot read index folder %s: %s", folder, error)
        return ""


def _short_name(name: str, limit: int = STATUS_NAME_MAX_CHARACTERS) -> str:
    """Return ``name`` cut in the middle to ``limit`` characters, because the status line cannot wrap one word."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head):]}"


def _folder_key(folder: str) -> str:
    return os.path.normcase(os.path.abspath(folder))


def read_manifest_stamp(folder: PathLike) -> Optional[Tuple[int, int, int]]:
    """Return the inode, size and modification time of the folder's manifest, or None without one.

    Every save of an index replaces its manifest, so a different stamp means the index changed.
    """
    try:
        info = os.stat(Path(folder) / MANIFEST_NAME)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _chosen_discard_warning(request: Optional[jobs.BuildRequest]) -> Optional[str]:
    """Return the warning about discarded checkpoints when the analyst chose to discard them, else None."""
    if request is None or not request.params.discard_other_checkpoints:
        return None
    return discarded_checkpoints_warning(partial_folder_for(request.params.index_folder))


def _tile_count_text(count: int) -> str:
    return "1 tile" if count == 1 else f"{count} tiles"


def _build_settings_text(request: jobs.BuildRequest) -> str:
    params = request.params
    bands = ", ".join(str(band) for band in params.band_indexes) if params.band_indexes else "auto"
    return (f"encoder {Path(params.encoder_path).name}, GSD {_format_gsd(request.gsd)} m, overlap "
            f"{params.overlap_fraction * 100:.0f} %, bands {bands}")


def _format_gsd(gsd_m: float) -> str:
    # Every decimal the GSD field holds: ":g" would round a bound of 1000 m/px or more to six
    # digits, which can fall outside the range.
    return f"{gsd_m:.{GSD_DECIMALS}f}".rstrip("0").rstrip(".")


def _matches_index_gsd(folder: str, gsd_m: float) -> bool:
    """Tell whether ``gsd_m``, as the GSD field shows it, is the GSD of the index in ``folder``."""
    index_grid = _index_grid_in(folder)
    return index_grid is not None and math.isclose(gsd_m, index_grid.gsd_m, abs_tol=0.5 * 10 ** -GSD_DECIMALS)


def _index_grid_in(folder: str) -> Optional[TileGrid]:
    # An empty field is no folder, not the working directory.
    return first_grid_in(Path(folder)) if folder else None


def _started_in_closed_project(dock, task: LookalikeTask) -> bool:
    return getattr(task, "project_epoch", dock.project_epoch) != dock.project_epoch


def _native_pixel_size_m(layer: Optional[QgsMapLayer]) -> Optional[float]:
    """Return a raster layer's pixel size in metres, or None for tile services and other layers."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        return None
    if not layer.dataProvider().capabilities() & RASTER_SIZE_CAPABILITY or layer.width() <= 0:
        return None
    return default_gsd_m(layer, None)


def suggested_gsd_m(layer: QgsRasterLayer, canvas, spec: Optional[ModelSpec]) -> float:
    """Return the GSD to start from for this raster and encoder.

    That is the encoder's suggested tile, widened to ``MIN_DEFAULT_TILE_SIZE_SOURCE_PX`` raster
    pixels on coarse imagery as the engine's default is (see ``core.planning``), or the raster's
    pixel size when the encoder suggests no GSD.
    """
    pixel_size_m = _native_pixel_size_m(layer)
    tile_ground_size_m = spec.tile_ground_size_m if spec is not None else None
    if spec is not None and tile_ground_size_m is None and spec.gsd_m:
        tile_ground_size_m = spec.gsd_m * spec.input_size_px
    if spec is None or tile_ground_size_m is None:
        return default_gsd_m(layer, canvas)
    if pixel_size_m is not None:
        tile_ground_size_m = max(tile_ground_size_m, MIN_DEFAULT_TILE_SIZE_SOURCE_PX * pixel_size_m)
    return tile_ground_size_m / spec.input_size_px


def default_gsd_m(layer: QgsRasterLayer, canvas) -> float:
    """Return the layer's native pixel size in metres, or the map view's for tile services."""
    provider = layer.dataProvider()
    if provider.capabilities() & RASTER_SIZE_CAPABILITY and layer.width() > 0:
        width, height = layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY()
        if layer.crs().isGeographic():
            # A degree of longitude shrinks with latitude and one of latitude does not. The geometric
            # mean of both sides in metres is the pixel size the engine plans with (core.planning).
            centre_latitude = layer.extent().center().y()
            width_m = width * METRES_PER_DEGREE * max(math.cos(math.radians(centre_latitude)), 0.01)
            return math.sqrt(width_m * height * METRES_PER_DEGREE)
        size = math.sqrt(width * height)
        if layer.crs().isValid():
            return size * ground_metres_per_unit(layer)
        return size
    return canvas.mapUnitsPerPixel() if not canvas.mapSettings().destinationCrs().isGeographic() else 1.0

