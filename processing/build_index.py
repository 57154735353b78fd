"""``lookalike:buildindex``: embed the tiles of one or more rasters into an index folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from ..core.encoder import OnnxEncoder, default_model_path
from ..core.grid import stride_from_overlap
from ..core.index import first_grid_in
from ..core.parameters import MAX_ENCODER_THREADS, MAX_OVERLAP_PERCENT
from ..core.pipeline import BuildParameters, Progress, Region, build_index, describe_skipped
from .compat import NUMBER_DOUBLE, NUMBER_INTEGER, PARAMETER_ADVANCED, SOURCE_RASTER, SOURCE_VECTOR_POLYGON
from .support import (
    ENCODER_FILE_FILTER,
    ENCODER_PACKAGES,
    EXTENT_CRS_FIX,
    INDEX_PACKAGES,
    LookalikeAlgorithm,
    cancel_check,
    core_errors,
    crs_wkt,
    feature_geometries_wkt,
    gdal_source_path,
    require_packages,
    set_progress,
    tr,
    with_parameter_names,
)

TILE_SIZE_UNIT_SOURCE_PX = 0
TILE_SIZE_UNIT_GROUND = 1
# The enum values stay 0 and 1, so saved models and scripts keep working.
TILE_SIZE_UNITS = ("Source pixels (of the first raster)", "Metres on the ground")

# Processing names of the core's BuildParameters fields, for core messages that name a field.
PARAMETER_NAMES = {
    "source_paths": "INPUT_RASTERS",
    "index_folder": "OUTPUT",
    "encoder_path": "ENCODER",
    "tile_size_source_px": "TILE_SIZE with TILE_SIZE_UNIT=0",
    "tile_ground_size_m": "TILE_SIZE with TILE_SIZE_UNIT=1 (metres), or GSD times the encoder's input size",
    "overlap_fraction": "OVERLAP_PERCENT",
    "band_indexes": "BANDS",
    "add_to_existing": "APPEND",
    "overwrite_existing_index": "OVERWRITE",
    "discard_other_checkpoints": "DISCARD_CHECKPOINTS",
    "encoder_threads": "ENCODER_THREADS",
    "max_tile_count": "a limit this algorithm keeps; raise it only through build_index in Python",
}


class BuildIndexAlgorithm(LookalikeAlgorithm):
    """Build (or extend) a Lookalike index folder from rasters; wraps ``core.pipeline.build_index``."""

    ALGORITHM_ID = "buildindex"
    DISPLAY_NAME = "Build similarity index"
    SUMMARY = (
        "Cuts the rasters into a grid of square tiles, embeds every tile with the ONNX encoder and "
        "stores the embeddings in an HNSW index folder that 'Search similar tiles' queries. Tiles "
        "that are mostly nodata, blank or under the mask are skipped. A cancelled build keeps its "
        "finished batches in a folder named like the index folder with '.partial' appended, and "
        "continues from there when it is run again with the same parameters. A build with other "
        "parameters into that folder stops instead of deleting those tiles, unless DISCARD_CHECKPOINTS is set."
    )

    VALUE_HINTS = {
        "OVERLAP_PERCENT": (
            "It is in percent of the tile side: 50 halves the stride between tiles, and at 100 the "
            "tiles would not advance."
        ),
        "TILE_SIZE": "Its unit is set by TILE_SIZE_UNIT: 0 for source pixels, 1 for metres on the ground.",
        "GSD": "It is in metres on the ground per encoder input pixel.",
    }
    POSITIVE_NUMBERS = frozenset({"TILE_SIZE", "GSD"})

    INPUT_RASTERS = "INPUT_RASTERS"
    ENCODER = "ENCODER"
    TILE_SIZE = "TILE_SIZE"
    TILE_SIZE_UNIT = "TILE_SIZE_UNIT"
    OVERLAP_PERCENT = "OVERLAP_PERCENT"
    GSD = "GSD"
    EXTENT = "EXTENT"
    MASK = "MASK"
    BANDS = "BANDS"
    APPEND = "APPEND"
    OVERWRITE = "OVERWRITE"
    DISCARD_CHECKPOINTS = "DISCARD_CHECKPOINTS"
    ENCODER_THREADS = "ENCODER_THREADS"
    OUTPUT = "OUTPUT"

    TILES_TOTAL = "TILES_TOTAL"
    TILES_EMBEDDED = "TILES_EMBEDDED"
    TILES_SKIPPED = "TILES_SKIPPED"
    TILES_RESUMED = "TILES_RESUMED"
    GSD_USED = "GSD_USED"
    TILE_GROUND_SIZE = "TILE_GROUND_SIZE"
    ENCODER_NAME = "ENCODER_NAME"

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802 - QGIS API
        rasters = QgsProcessingParameterMultipleLayers(
            self.INPUT_RASTERS, tr("Rasters to index"), SOURCE_RASTER
        )
        rasters.setHelp(tr(
            "One or more rasters read by GDAL (GeoTIFF, COG, VRT...). All of them share the tile "
            "size and GSD of the first one, so dates or strips of one area can be searched together."
        ))
        self.addParameter(rasters)

        encoder = QgsProcessingParameterFile(
            self.ENCODER, tr("Encoder (ONNX model)"), defaultValue=str(default_model_path()), optional=True,
            # A filter, not an extension, because QGIS rejects a file of another extension with a
            # message that names no file, before the encoder check can report what is wrong with it.
            fileFilter=ENCODER_FILE_FILTER,
        )
        encoder.setHelp(tr(
            "ONNX image encoder with a Lookalike or Deepness model spec in its metadata. Empty selects "
            "the bundled EfficientNet-Lite0. Searches must use the same encoder file."
        ))
        self.addParameter(encoder)

        tile_size = QgsProcessingParameterNumber(
            self.TILE_SIZE, tr("Tile size"), NUMBER_DOUBLE, optional=True, minValue=0.0
        )
        tile_size.setHelp(tr(
            "Side of one square tile, in the unit chosen below. Empty uses the encoder's suggested "
            "ground size, or 224 source pixels when it has none. Choose it about the size of the "
            "objects to find. Each tile is resampled to the encoder's input size."
        ))
        self.addParameter(tile_size)

        unit = QgsProcessingParameterEnum(
            self.TILE_SIZE_UNIT, tr("Tile size unit"), options=[tr(option) for option in TILE_SIZE_UNITS],
            defaultValue=TILE_SIZE_UNIT_SOURCE_PX,
        )
        unit.setHelp(tr(
            "0: pixels of the first raster. 1: metres on the ground. Each raster's tile grid converts "
            "them to its CRS's units and scale, so 160 m is about 525 US survey feet in EPSG:2227 and "
            "about 202 CRS metres in EPSG:3857 at 37.7 degrees north. Rasters in degrees are gridded "
            "in their WGS 84 UTM zone."
        ))
        self.addParameter(unit)

        overlap = QgsProcessingParameterNumber(
            self.OVERLAP_PERCENT, tr("Tile overlap (%)"), NUMBER_DOUBLE,
            defaultValue=None, optional=True, minValue=0.0, maxValue=float(MAX_OVERLAP_PERCENT),
        )
        overlap.setHelp(tr(
            "Overlap between neighbouring tiles, in percent of the tile side (0 to 95). 50 halves the "
            "stride, so an object is more likely to sit whole in some tile, at four times the tiles. "
            "Empty: 0 for a new index, the index's own overlap with APPEND."
        ))
        self.addParameter(overlap)

        gsd = QgsProcessingParameterNumber(
            self.GSD, tr("Ground sample distance override (metres per encoder pixel)"),
            NUMBER_DOUBLE, optional=True, minValue=0.0,
        )
        gsd.setHelp(tr(
            "Ground size of one encoder input pixel, in metres on the ground, converted to each grid "
            "CRS's units and scale as for TILE_SIZE_UNIT=1. Sets the tile size to GSD x the encoder's "
            "input size, so leave Tile size empty when using it."
        ))
        self.addParameter(gsd)

        extent = QgsProcessingParameterExtent(self.EXTENT, tr("Extent to index"), optional=True)
        extent.setHelp(tr("Only tiles that overlap this extent are indexed. Empty indexes the whole rasters."))
        self.addParameter(extent)

        mask = QgsProcessingParameterFeatureSource(
            self.MASK, tr("Mask polygons (areas to leave out)"), [SOURCE_VECTOR_POLYGON], optional=True
        )
        mask.setHelp(tr(
            "Polygons over areas that must not be indexed, such as clouds or the query area itself. "
            "A tile is skipped when more than half of it lies under the polygons."
        ))
        self.addParameter(mask)

        bands = QgsProcessingParameterString(self.BANDS, tr("Band mapping"), optional=True)
        bands.setHelp(tr(
            "Comma-separated 1-based band numbers of each raster, one per encoder input band and in "
            "the encoder's order, e.g. '3,2,1' for the RGB encoders when the file stores B,G,R. Empty "
            "picks red, green and blue by colour interpretation."
        ))
        self.addParameter(bands)

        append = QgsProcessingParameterBoolean(self.APPEND, tr("Add to the existing index in the folder"), False)
        append.setHelp(tr(
            "Add the rasters to the index already in the output folder instead of creating one. The "
            "tile size, GSD, overlap and encoder must match the index's; leave the tile size and the "
            "overlap empty to use the index's."
        ))
        self.addParameter(append)

        overwrite = QgsProcessingParameterBoolean(self.OVERWRITE, tr("Replace an existing index"), False)
        overwrite.setHelp(tr("Replace the index already in the output folder. Cannot be combined with APPEND."))
        self.addParameter(overwrite)

        discard = QgsProcessingParameterBoolean(
            self.DISCARD_CHECKPOINTS, tr("Discard the tiles of an interrupted build with other settings"), False
        )
        discard.setHelp(tr(
            "An interrupted build keeps its finished tiles in the folder named like the index folder with "
            "'.partial' appended. A build with other settings into the same folder stops and names the "
            "settings that differ, so that those tiles are not lost by mistake. Set this to delete them "
            "and start the new build."
        ))
        discard.setFlags(discard.flags() | PARAMETER_ADVANCED)
        self.addParameter(discard)

        threads = QgsProcessingParameterNumber(
            self.ENCODER_THREADS, tr("Encoder threads (0: one per physical core)"),
            NUMBER_INTEGER, defaultValue=0, minValue=0, maxValue=MAX_ENCODER_THREADS,
        )
        threads.setHelp(tr(
            "Threads the encoder runs on. 0 uses one per physical CPU core, the fastest build. One "
            "fewer than the cores keeps a core free for reading tiles and for QGIS, at some cost in speed."
        ))
        threads.setFlags(threads.flags() | PARAMETER_ADVANCED)
        self.addParameter(threads)

        output = QgsProcessingParameterFolderDestination(self.OUTPUT, tr("Index folder"))
        output.setHelp(tr(
            "Folder that receives manifest.json, the HNSW graph, the embeddings and the tile table. It "
            "must be new, empty or (with APPEND or OVERWRITE) contain an index."
        ))
        self.addParameter(output)

        self.addOutput(QgsProcessingOutputNumber(self.TILES_TOTAL, tr("Tiles in the grids")))
        self.addOutput(QgsProcessingOutputNumber(self.TILES_EMBEDDED, tr("Tiles embedded")))
        self.addOutput(QgsProcessingOutputNumber(self.TILES_SKIPPED, tr("Tiles skipped")))
        self.addOutput(QgsProcessingOutputNumber(self.TILES_RESUMED, tr("Tiles taken from an interrupted run")))
        self.addOutput(QgsProcessingOutputNumber(
            self.GSD_USED, tr("GSD of the first tile grid (metres on the ground per encoder pixel)")
        ))
        self.addOutput(QgsProcessingOutputNumber(
            self.TILE_GROUND_SIZE, tr("Tile side of the first tile grid (metres on the ground)")
        ))
        self.addOutput(QgsProcessingOutputString(self.ENCODER_NAME, tr("Encoder name")))

    def processAlgorithm(  # noqa: N802 - QGIS API
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict[str, Any]:
        require_packages(ENCODER_PACKAGES + INDEX_PACKAGES)
        build_parameters = self._build_parameters(parameters, context)

        def report_progress(progress: Progress) -> None:
            set_progress(feedback, progress.tiles_done, progress.tiles_total)

        feedback.pushInfo(tr(
            f"Indexing {len(build_parameters.source_paths)} raster(s) into {build_parameters.index_folder}"
        ))
        overlap_percent = _optional_number(self, parameters, self.OVERLAP_PERCENT, context)
        if overlap_percent is not None and 0.0 < overlap_percent < 1.0:
            # A fraction typed where a percentage is expected gives tiles that barely overlap.
            feedback.pushWarning(tr(
                f"{self.OVERLAP_PERCENT}={overlap_percent:g} is read as {overlap_percent:g} % of the tile side, "
                f"almost no overlap. For an overlap of {100.0 * overlap_percent:g} % of the tile side, give "
                f"{self.OVERLAP_PERCENT}={100.0 * overlap_percent:g}."
            ))
        with core_errors(PARAMETER_NAMES):
            report = build_index(build_parameters, progress=report_progress, is_cancelled=cancel_check(feedback))

        for warning in report.warnings:
            feedback.pushWarning(with_parameter_names(warning, PARAMETER_NAMES))
        skipped = describe_skipped(report.skipped_by_reason)
        if report.already_complete:
            feedback.pushWarning(tr(
                f"The index in {report.index_folder} already contains this build (the same rasters and "
                f"parameters), so nothing was embedded or added. {self.TILES_EMBEDDED} counts the tiles of "
                "that earlier build."
            ))
        else:
            resumed = (f" The first {report.tiles_resumed} tiles came from the checkpoints of an interrupted run."
                       if report.tiles_resumed else "")
            feedback.pushInfo(tr(
                f"{report.tiles_embedded} of {report.tiles_total} tiles embedded with {report.encoder_name} "
                f"(skipped: {skipped or 'none'}) in {report.elapsed_s:.1f} s.{resumed}"
            ))
        if report.tiles_total and not report.tiles_embedded:
            feedback.reportError(
                tr("Every tile was skipped, so the index is empty; check the nodata value, mask and extent."),
                fatalError=False,
            )
        set_progress(feedback, 1, 1)
        return {
            self.OUTPUT: report.index_folder,
            self.TILES_TOTAL: report.tiles_total,
            self.TILES_EMBEDDED: report.tiles_embedded,
            self.TILES_SKIPPED: report.tiles_skipped,
            self.TILES_RESUMED: report.tiles_resumed,
            # In metres, the unit of the GSD parameter, so the value can be passed back to GSD.
            self.GSD_USED: report.grids[0].gsd_m if report.grids else None,
            self.TILE_GROUND_SIZE: report.grids[0].tile_ground_size_m if report.grids else None,
            self.ENCODER_NAME: report.encoder_name,
        }

    def _build_parameters(self, parameters: dict, context: QgsProcessingContext) -> BuildParameters:
        layers = self.parameterAsLayerList(parameters, self.INPUT_RASTERS, context)
        if not layers:
            raise QgsProcessingException(tr(f"{self.INPUT_RASTERS} is empty; choose at least one raster to index."))
        source_paths = tuple(gdal_source_path(layer, self.INPUT_RASTERS) for layer in layers)

        encoder_path = self.parameterAsFile(parameters, self.ENCODER, context) or None
        tile_size_source_px, tile_ground_size_m = self._tile_size(parameters, context, encoder_path)

        extent = None
        if parameters.get(self.EXTENT):
            rectangle = self.parameterAsExtent(parameters, self.EXTENT, context)
            extent_crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
            if not rectangle.isEmpty():
                extent = Region(
                    crs_wkt=crs_wkt(extent_crs, self.EXTENT, EXTENT_CRS_FIX),
                    bounds=(rectangle.xMinimum(), rectangle.yMinimum(), rectangle.xMaximum(), rectangle.yMaximum()),
                )

        mask = None
        mask_source = self.parameterAsSource(parameters, self.MASK, context)
        if mask_source is not None:
            polygons = feature_geometries_wkt(mask_source, self.MASK)
            if polygons:
                mask = Region(crs_wkt=crs_wkt(mask_source.sourceCrs(), self.MASK), polygons_wkt=tuple(polygons))

        with core_errors(PARAMETER_NAMES):
            return BuildParameters(
                source_paths=source_paths,
                index_folder=self.parameterAsString(parameters, self.OUTPUT, context),
                encoder_path=encoder_path,
                tile_size_source_px=tile_size_source_px,
                tile_ground_size_m=tile_ground_size_m,
                overlap_fraction=self._overlap_fraction(parameters, context),
                extent=extent,
                mask=mask,
                band_indexes=parse_band_indexes(self.parameterAsString(parameters, self.BANDS, context), self.BANDS),
                add_to_existing=self.parameterAsBool(parameters, self.APPEND, context),
                overwrite_existing_index=self.parameterAsBool(parameters, self.OVERWRITE, context),
                discard_other_checkpoints=self.parameterAsBool(parameters, self.DISCARD_CHECKPOINTS, context),
                encoder_threads=self.parameterAsInt(parameters, self.ENCODER_THREADS, context) or None,
            )

    def _overlap_fraction(self, parameters: dict, context: QgsProcessingContext) -> float:
        """Return OVERLAP_PERCENT as a fraction. Left empty, it is 0, or the index's overlap with APPEND."""
        overlap_percent = _optional_number(self, parameters, self.OVERLAP_PERCENT, context)
        index_grid = None
        if self.parameterAsBool(parameters, self.APPEND, context):
            index_grid = first_grid_in(Path(self.parameterAsString(parameters, self.OUTPUT, context)))
        if index_grid is None:
            # Without a readable index the build reports what is wrong with the folder.
            return 0.0 if overlap_percent is None else overlap_percent / 100.0
        # The exact fraction, because a rounded percentage can give a stride other than the index's.
        index_fraction = index_grid.overlap_fraction
        if overlap_percent is None:
            return index_fraction
        if not 0.0 <= overlap_percent < 100.0:
            # Out of range (or NaN): BuildParameters names the valid range.
            return overlap_percent / 100.0
        with core_errors(PARAMETER_NAMES):
            stride_px = stride_from_overlap(index_grid.tile_size_px, overlap_fraction=overlap_percent / 100.0)
        if stride_px != index_grid.stride_px:
            raise QgsProcessingException(tr(
                f"{self.OVERLAP_PERCENT}={overlap_percent:g} gives a stride of {stride_px} of "
                f"{index_grid.tile_size_px} encoder pixels, but the index in the {self.OUTPUT} folder has a stride "
                f"of {index_grid.stride_px} ({100.0 * index_fraction:.6g} % overlap); leave {self.OVERLAP_PERCENT} "
                f"empty to use the index's overlap, or give {100.0 * index_fraction:.6g}."
            ))
        return overlap_percent / 100.0

    def _tile_size(
        self, parameters: dict, context: QgsProcessingContext, encoder_path: Optional[str]
    ) -> tuple[Optional[float], Optional[float]]:
        """Return ``(tile_size_source_px, tile_ground_size_m)`` from TILE_SIZE, its unit and GSD."""
        tile_size = _optional_number(self, parameters, self.TILE_SIZE, context)
        gsd = _optional_number(self, parameters, self.GSD, context)
        if tile_size is not None and gsd is not None:
            raise QgsProcessingException(tr(
                f"Both {self.TILE_SIZE}={tile_size:g} and {self.GSD}={gsd:g} were given, but the GSD "
                "fixes the tile size; leave one of them empty."
            ))
        for name, value in ((self.TILE_SIZE, tile_size), (self.GSD, gsd)):
            if value is not None and value <= 0:
                raise QgsProcessingException(
                    tr(f"{name}={value:g} is invalid; give a positive number or leave it empty.")
                )
        if gsd is not None:
            # The tile is always read at the encoder's input size, so a GSD in metres fixes the
            # tile's ground size in metres.
            with core_errors(PARAMETER_NAMES):
                input_size_px = OnnxEncoder(encoder_path or default_model_path()).spec.input_size_px
            return None, gsd * input_size_px
        if tile_size is None:
            return None, None
        if self.parameterAsEnum(parameters, self.TILE_SIZE_UNIT, context) == TILE_SIZE_UNIT_GROUND:
            return None, tile_size
        return tile_size, None


def parse_band_indexes(text: str, parameter_name: str) -> Optional[tuple[int, ...]]:
    """Parse '3,2,1' into (3, 2, 1); an empty text means "choose by colour interpretation"."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        band_indexes = tuple(int(part) for part in text.replace(";", ",").split(","))
    except ValueError as error:
        raise QgsProcessingException(tr(
            f"{parameter_name}={text!r} is invalid; give comma-separated 1-based band numbers such as '3,2,1'."
        )) from error
    if any(index < 1 for index in band_indexes):
        raise QgsProcessingException(tr(
            f"{parameter_name}={text!r} contains a band number below 1; band numbers start at 1."
        ))
    return band_indexes


def _optional_number(
    algorithm: LookalikeAlgorithm, parameters: dict, name: str, context: QgsProcessingContext
) -> Optional[float]:
    # parameterAsDouble returns 0 for an unset optional number, which is a valid-looking value.
    if parameters.get(name) in (None, ""):
        return None
    return algorithm.parameterAsDouble(parameters, name, context)
