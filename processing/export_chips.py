"""``lookalike:exportchips``: write the image under each match footprint to a chip file."""

from __future__ import annotations

import os
from typing import Any, Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterField,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
)

from ..gis import chip_export
from ..gis import matches as match_layers
from .build_index import parse_band_indexes
from .compat import NUMBER_INTEGER, SOURCE_VECTOR_POLYGON
from .support import (
    LookalikeAlgorithm,
    cancel_check,
    core_errors,
    gdal_source_path,
    reject_output_in_any_index,
    reject_outputs_over_rasters,
    set_progress,
    tr,
)

FORMATS = (chip_export.FORMAT_GEOTIFF, chip_export.FORMAT_PNG)
FORMAT_LABELS = ("GeoTIFF (georeferenced)", "PNG")


class ExportChipsAlgorithm(LookalikeAlgorithm):
    """Cut one chip per match footprint out of a raster and list them in labels.csv."""

    ALGORITHM_ID = "exportchips"
    DISPLAY_NAME = "Export match chips"
    SUMMARY = (
        "Writes the image under every feature of a match layer (or any polygon layer) to a chip file "
        "in the output folder, best rank first, plus labels.csv with the chip file, label, rank, "
        "score, tile and bounds of each. Chips hold 8-bit values as the encoder sees them (8-bit "
        "imagery unchanged, other types stretched from the 2nd to the 98th percentile) and an alpha "
        "band that is 0 over nodata. Footprints with no valid pixel are skipped."
    )

    VALUE_HINTS = {
        "CHIP_SIZE_PX": "It is the long side of each chip in pixels; 0 keeps the raster's native resolution.",
    }

    INPUT = "INPUT"
    RASTER = "RASTER"
    FORMAT = "FORMAT"
    CHIP_SIZE_PX = "CHIP_SIZE_PX"
    BANDS = "BANDS"
    LABEL = "LABEL"
    LABEL_FIELD = "LABEL_FIELD"
    OUTPUT = "OUTPUT"
    LABELS_CSV = "LABELS_CSV"
    CHIP_COUNT = "CHIP_COUNT"
    SKIPPED_COUNT = "SKIPPED_COUNT"

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802 - QGIS API
        layer = QgsProcessingParameterVectorLayer(
            self.INPUT, tr("Matches"), [SOURCE_VECTOR_POLYGON]
        )
        layer.setHelp(tr(
            "Polygon layer of footprints, usually the output of 'Search similar tiles'. Only selected "
            "features are exported when the layer has a selection."
        ))
        self.addParameter(layer)

        raster = QgsProcessingParameterRasterLayer(self.RASTER, tr("Raster to cut the chips from"), optional=True)
        raster.setHelp(tr(
            f"Raster read by GDAL. Empty reads each feature from the raster named in its "
            f"'{match_layers.FIELD_SOURCE}' field, as search results record it."
        ))
        self.addParameter(raster)

        image_format = QgsProcessingParameterEnum(
            self.FORMAT, tr("Chip format"), options=[tr(label) for label in FORMAT_LABELS], defaultValue=0
        )
        image_format.setHelp(tr(
            "0: GeoTIFF in the raster's CRS, deflate-compressed. 1: PNG without georeferencing (the "
            "bounds are in labels.csv)."
        ))
        self.addParameter(image_format)

        chip_size = QgsProcessingParameterNumber(
            self.CHIP_SIZE_PX, tr("Chip size (pixels, long side)"), NUMBER_INTEGER,
            defaultValue=0, minValue=0, maxValue=chip_export.MAX_NATIVE_CHIP_SIZE_PX,
        )
        chip_size.setHelp(tr(
            "Pixels along the long side of each chip, e.g. 224 for training sets. 0, the default, reads each "
            f"footprint at the raster's native resolution (at most {chip_export.MAX_NATIVE_CHIP_SIZE_PX} px)."
        ))
        self.addParameter(chip_size)

        bands = QgsProcessingParameterString(self.BANDS, tr("Band mapping"), optional=True)
        bands.setHelp(tr(
            "Comma-separated 1-based band numbers to write, e.g. '3,2,1'. Empty picks red, green and "
            "blue by colour interpretation, as the index build does. PNG takes 1 or 3 bands."
        ))
        self.addParameter(bands)

        label = QgsProcessingParameterString(self.LABEL, tr("Label"), defaultValue="match", optional=True)
        label.setHelp(tr("Text written in the label column of labels.csv for every chip; 'match' when left unset."))
        self.addParameter(label)

        label_field = QgsProcessingParameterField(
            self.LABEL_FIELD, tr("Label field"), parentLayerParameterName=self.INPUT, optional=True
        )
        label_field.setHelp(tr("Field whose value is written as each chip's label, instead of the Label text."))
        self.addParameter(label_field)

        output = QgsProcessingParameterFolderDestination(self.OUTPUT, tr("Chip folder"))
        output.setHelp(tr(
            "Folder that receives chip_00001.tif (or .png), ... and labels.csv; an existing labels.csv "
            "is replaced, and the chips it lists are replaced or removed."
        ))
        self.addParameter(output)

        self.addOutput(QgsProcessingOutputFile(self.LABELS_CSV, tr("Labels CSV")))
        self.addOutput(QgsProcessingOutputNumber(self.CHIP_COUNT, tr("Chips written")))
        self.addOutput(QgsProcessingOutputNumber(self.SKIPPED_COUNT, tr("Footprints skipped (no valid pixel)")))

    def processAlgorithm(  # noqa: N802 - QGIS API
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict[str, Any]:
        layer = self.parameterAsVectorLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, self.INPUT))
        raster_path = None
        if parameters.get(self.RASTER):
            raster_path = gdal_source_path(self.parameterAsRasterLayer(parameters, self.RASTER, context), self.RASTER)
        folder = self.parameterAsString(parameters, self.OUTPUT, context)
        chip_size_px = self.parameterAsInt(parameters, self.CHIP_SIZE_PX, context) or None
        feature_ids = layer.selectedFeatureIds() or None

        with core_errors({"Chip format": self.FORMAT, "Chip size": self.CHIP_SIZE_PX, "raster_path": self.RASTER}):
            requests = chip_export.chip_requests_from_layer(
                layer,
                raster_path=raster_path,
                label=self.parameterAsString(parameters, self.LABEL, context),
                label_field=self.parameterAsString(parameters, self.LABEL_FIELD, context) or None,
                feature_ids=feature_ids,
                transform_context=context.transformContext(),
            )
            image_format = FORMATS[self.parameterAsEnum(parameters, self.FORMAT, context)]
            reject_outputs_over_rasters(
                _output_files(folder, len(requests), image_format), self.OUTPUT,
                [request.source_path for request in requests],
                self.RASTER if raster_path else f"the '{match_layers.FIELD_SOURCE}' field of {self.INPUT}",
            )
            reject_output_in_any_index(folder, self.OUTPUT, is_folder=True)
            feedback.pushInfo(tr(f"Exporting {len(requests)} chips to {folder}"))
            report = chip_export.export_chips(
                requests,
                folder,
                image_format=image_format,
                chip_size_px=chip_size_px,
                band_indexes=parse_band_indexes(self.parameterAsString(parameters, self.BANDS, context), self.BANDS),
                progress=lambda done, total: set_progress(feedback, done, total),
                is_cancelled=cancel_check(feedback),
            )

        for feature_id, reason in report.skipped:
            feedback.pushWarning(tr(f"Feature {feature_id} skipped: {reason}."))
        feedback.pushInfo(tr(f"Wrote {report.written_count} chips and {report.csv_path}."))
        return {
            self.OUTPUT: str(report.folder),
            self.LABELS_CSV: str(report.csv_path),
            self.CHIP_COUNT: report.written_count,
            self.SKIPPED_COUNT: len(report.skipped),
        }


def _output_files(folder: str, chip_count: int, image_format: str) -> list[str]:
    # The names chip_export.export_chips writes: one chip per request, numbered from 1, and the CSV.
    extension = chip_export.FILE_EXTENSIONS[image_format]
    names = [f"chip_{position:05d}.{extension}" for position in range(1, chip_count + 1)]
    return [os.path.join(folder, name) for name in [*names, chip_export.LABELS_CSV_NAME]]
