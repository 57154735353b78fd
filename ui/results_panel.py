"""The results group of the Lookalike dock: score histogram, results table, thumbnails and export."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from qgis.core import Qgis, QgsCoordinateTransform, QgsFeatureRequest, QgsGeometry, QgsVectorLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
)

from ..core import get_logger
from ..core.errors import LookalikeError
from ..gis import matches as match_layers
from ..gis.tasks import LookalikeTask, TaskOutcome
from . import jobs
from .dock_constants import CHIP_FORMATS, EXPORT_FORMATS, THRESHOLD_STEPS
from .result_layer import forget_matches, stored_min_score, tile_ids_by_feature_id
from .results import Relevance, ResultsTable, ScoreHistogram

LOGGER = get_logger("ui.dock")


class ResultsPanelMixin:
    """Widgets and slots of the "Results" group, mixed into ``LookalikeDockWidget``."""

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
        self.results_table.relevanceChanged.connect(self._update_query_label)
        layout.addWidget(self.results_table)
        self.project.layerWillBeRemoved.connect(self._on_layer_will_be_removed)

        marks_row = QHBoxLayout()
        for label, relevance, name in (
            ("Relevant", Relevance.RELEVANT, "lookalikeMarkRelevant"),
            ("Not relevant", Relevance.NOT_RELEVANT, "lookalikeMarkNotRelevant"),
            ("Clear mark", Relevance.UNMARKED, "lookalikeClearMark"),
        ):
            button = QPushButton(label)
            button.setObjectName(name)
            if relevance is Relevance.UNMARKED:
                button.setToolTip("Clear the marks of the selected rows; with no row selected, clear every mark")
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

    # -- results -------------------------------------------------------------------------------

    def _load_thumbnails(self, found: list) -> None:
        if not found or self.index is None:
            return
        sources = self.index.sources
        task = LookalikeTask(
            "Lookalike: read match thumbnails",
            lambda running: jobs.thumbnails_work(found, sources, running),
            lambda done: self._on_thumbnails_loaded(done, found),
        )
        self._start_task(task)

    def _on_thumbnails_loaded(self, task: LookalikeTask, found: list) -> None:
        if task.outcome is not TaskOutcome.SUCCEEDED:
            if task.outcome is TaskOutcome.FAILED:
                LOGGER.warning("Reading thumbnails failed: %s", task.error)
            return
        if found is not self.matches:
            # A later search (or another index) filled the table; tile ids here may name other tiles.
            return
        for tile_id, image in task.result.items():
            self.results_table.set_thumbnail(tile_id, image)

    def watch_result_layer(self, layer: QgsVectorLayer) -> None:
        """Follow the features the analyst deletes from a result layer just filled with matches."""
        self._result_feature_tiles[layer.id()] = tile_ids_by_feature_id(layer)
        layer.committedFeaturesRemoved.connect(self._on_result_features_removed)

    def _on_result_features_removed(self, layer_id: str, feature_ids) -> None:
        """Leave deleted features out of the layer's saved matches and, for the table's layer, out of the table."""
        tiles = self._result_feature_tiles.get(layer_id)
        if not tiles:
            return
        removed = {tiles.pop(feature_id) for feature_id in feature_ids if feature_id in tiles}
        layer = self.project.mapLayer(layer_id)
        if not removed or not isinstance(layer, QgsVectorLayer):
            return
        forget_matches(layer, removed)
        if layer_id != self.result_layer_id:
            return
        self.matches = [match for match in self.matches if match.tile_id not in removed]
        # Marks stay: they steer the query's searches also for tiles no longer listed.
        self.results_table.remove_tiles(removed)
        self._fill_result_views(self.matches, stored_min_score(layer), keep_rows=True)

    def _on_layer_will_be_removed(self, layer_id: str) -> None:
        """Empty the table when the analyst removes the result layer, whose rows it lists."""
        self._result_feature_tiles.pop(layer_id, None)
        if not layer_id or layer_id != self.result_layer_id:
            return
        self.result_layer_id = ""
        self.matches = []
        # Marks are shown only in the table's rows, so marks left without rows would steer later
        # searches unseen.
        self.results_table.clear_marks()
        self.results_table.set_matches([])
        self.histogram.set_scores([])
        self._on_threshold_changed(0)
        if self.search_task is not None:
            # The running search uses the marks just cleared, so the query runs again without them.
            self._search_again = any(not negative for _geometry, negative, _crs in self.query_parts)
            self.search_task.cancel()
            if not self._search_again:
                self.push_message(
                    "The running search used the relevance marks of the removed layer, so it was cancelled, and the "
                    "query has no positive part to search with; draw one to search again.",
                    Qgis.MessageLevel.Info,
                )
        self._update_query_label()

    def match_geometry(self, tile_id: int) -> Optional[QgsGeometry]:
        layer = self.result_layer()
        if layer is None:
            return None
        request = QgsFeatureRequest().setFilterExpression(f'"{match_layers.FIELD_TILE_ID}" = {int(tile_id)}')
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
        if not tile_ids and relevance is Relevance.UNMARKED and self.results_table.marks():
            # Marks of tiles a later search no longer lists have no row to select, yet they steer every
            # search of the query. So without a selection, Clear mark clears them all.
            count = len(self.results_table.marks())
            self.results_table.clear_marks()
            self._update_query_label()
            self._store_state()
            self.push_message(f"Cleared the {count} relevance mark(s) of this query.", Qgis.MessageLevel.Info)
            return
        if not tile_ids and relevance is Relevance.UNMARKED:
            self.push_message("This query has no relevance mark to clear.", Qgis.MessageLevel.Info)
            return
        if not tile_ids:
            self.push_message("Select result rows to mark them.", Qgis.MessageLevel.Info)
            return
        self.results_table.set_relevances(tile_ids, relevance)

    # -- export --------------------------------------------------------------------------------

    def export_layer_with_dialog(self) -> None:
        layer = self.result_layer()
        if layer is None:
            self.push_message("There is no result layer to export; run a search first.", Qgis.MessageLevel.Info)
            return
        format_name = self.export_format_combo.currentText()
        driver, extension = EXPORT_FORMATS[format_name]
        # The file dialog requests confirmation before replacing a file of the name as typed.
        path, _filter = QFileDialog.getSaveFileName(
            self, "Export the result layer", f"{layer.name()}.{extension}", f"{format_name} (*.{extension})"
        )
        if not path:
            return
        typed_path = path
        if not path.lower().endswith(f".{extension}"):
            path = f"{path}.{extension}"
        sharing = match_layers.dataset_sharing_files(path, driver)
        if sharing is not None:
            self.push_message(
                f"Exporting to {path} would replace {Path(path).with_suffix('.prj').name}, the CRS file that "
                f"{sharing} uses too; choose another file name.", Qgis.MessageLevel.Warning,
            )
            return
        if driver == "GPKG" and Path(path).is_file():
            foreign = match_layers.geopackage_tables_not_from_lookalike(path)
            if foreign is None:
                # A damaged file or another kind of file: replacing it could lose what it holds.
                self.push_message(
                    f"{path} exists but cannot be read as a GeoPackage (it may be damaged or another kind of file), "
                    "so the matches are not written over it; choose another file name, or delete that file first.",
                    Qgis.MessageLevel.Warning,
                )
                return
            if foreign:
                self._offer_to_add_layer(path, format_name, foreign)
                return
        # The dialog asked about the name as typed. Other files the export replaces (the name with
        # its extension, the .dbf and other files of a shapefile) are asked about here.
        unasked = [file for file in match_layers.files_replaced(path, driver) if str(file) != typed_path]
        if unasked:
            replace_question = (
                f"{path} already exists. Replace it with the result layer?" if unasked == [Path(path)]
                else f"Exporting to {path} replaces {', '.join(str(file) for file in unasked)}. "
                     "Replace them with the result layer?"
            )
            prj_readers = match_layers.other_files_of_prj(path, driver)
            if prj_readers:
                replace_question += (
                    f" {Path(path).with_suffix('.prj').name} may also be the CRS of "
                    f"{', '.join(file.name for file in prj_readers)}, which would then take the matches' CRS."
                )
            if not self._confirmed(replace_question):
                return
        self.export_layer(path, format_name, overwrite=True)

    def _offer_to_add_layer(self, path: str, format_name: str, foreign_layers: list[str]) -> None:
        """Ask to add the matches to the GeoPackage ``path`` as a new layer, since replacing it loses its layers."""
        layer = self.result_layer()
        base_name = layer.name() if layer is not None and layer.name() else "matches"
        layer_name = match_layers.free_layer_name(path, base_name)
        question = (
            f"{path} contains layers or tables that Lookalike did not write ({', '.join(foreign_layers)}), which "
            f"replacing the file would delete. Add the matches to it as the new layer '{layer_name}' instead? No "
            "leaves the file as it is."
        )
        if self._confirmed(question):
            self.export_layer(path, format_name, add_as_layer=layer_name)

    def export_layer(self, path: str, format_name: str = "GeoPackage", overwrite: bool = False,
                     add_as_layer: Optional[str] = None) -> Optional[Path]:
        """Write the current result layer with QGIS's vector writer; returns the path or None on failure.

        With ``add_as_layer`` the matches become a new layer of that name in the existing GeoPackage ``path``.
        """
        layer = self.result_layer()
        if layer is None:
            self.push_message("There is no result layer to export; run a search first.", Qgis.MessageLevel.Info)
            return None
        driver, _extension = EXPORT_FORMATS[format_name]
        try:
            written = match_layers.write_matches(layer, path, overwrite=overwrite, driver_name=driver,
                                                 layer_name=add_as_layer, add_to_file=add_as_layer is not None)
        except LookalikeError as error:
            self.push_message(str(error), Qgis.MessageLevel.Critical)
            return None
        count = layer.featureCount()
        # The layer's filter is the Min score slider: the matches below it are not written. Features
        # deleted from the layer are missing as well, and the slider does not explain those.
        total = len(self.matches)
        threshold = self.score_threshold()
        above_threshold = sum(1 for match in self.matches if match.score >= threshold)
        if layer.subsetString() and count < total and count == above_threshold:
            exported = f"{count} of the {total} matches, those at or above Min score {threshold:.3f},"
        else:
            exported = f"{count} {'match' if count == 1 else 'matches'}"
        where = f"{written} as the layer '{add_as_layer}'" if add_as_layer is not None else str(written)
        self.push_message(f"Exported {exported} to {where}.", Qgis.MessageLevel.Success)
        return written

    def export_chips_with_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the chips and labels.csv")
        if not folder:
            return
        from ..gis.chip_export import check_chip_folder

        chip_count = len(self.results_table.selected_tile_ids()) or sum(
            1 for match in self.matches if match.score >= self.score_threshold()
        )
        try:
            # Asked after this, the analyst would confirm an export that then stops anyway.
            check_chip_folder(folder, chip_count, CHIP_FORMATS[self.chip_format_combo.currentText()])
        except LookalikeError as error:
            self.push_message(str(error), Qgis.MessageLevel.Warning)
            return
        if any(Path(folder).iterdir()) and not self._confirmed(
            f"{folder} is not empty. Chips named chip_00001 and up and labels.csv there will be replaced. The "
            "chips an earlier labels.csv lists that this export does not write again will be removed, with their "
            "rows and any columns you added to them. Continue?"
        ):
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
        if not tile_ids:
            self.push_message("No match is shown to export; lower the score threshold or search again.",
                              Qgis.MessageLevel.Info)
            return None
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
                f"Exported {report.written_count} {'chip' if report.written_count == 1 else 'chips'} and "
                f"{report.csv_path.name} to {report.folder}{skipped}.",
                Qgis.MessageLevel.Success,
            )
        elif task.outcome is TaskOutcome.FAILED:
            self._report_failure("Exporting chips", task)
