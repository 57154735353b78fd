"""``lookalike:search``: find the tiles of an index that look like example geometries."""

from __future__ import annotations

from typing import Any, Optional

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeatureSink,
    QgsFeatureSource,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsWkbTypes,
)

from ..core.index import TileIndex
from ..core.pipeline import run_search
from ..core.search import DEFAULT_MAX_OVERLAP, DEFAULT_STRATEGY, STRATEGIES
from ..gis import matches as match_layers
from .support import (
    ENCODER_PACKAGES,
    INDEX_PACKAGES,
    LookalikeAlgorithm,
    core_errors,
    crs_wkt,
    gdal_source_path,
    geometry_wkt,
    require_packages,
    set_progress,
    tr,
)

# QGIS 3.30 moved the WKB types to Qgis.WkbType, and QGIS 4 drops the old alias.
POLYGON_WKB_TYPE = Qgis.WkbType.Polygon if hasattr(Qgis, "WkbType") else QgsWkbTypes.Type.Polygon

PARAMETER_NAMES = {
    "index_folder": "INDEX",
    "encoder_path": "ENCODER",
    "max_overlap": "MAX_OVERLAP",
    "min_score": "MIN_SCORE",
}

DEFAULT_K = 10


class SearchAlgorithm(LookalikeAlgorithm):
    """Query an index with positive (and negative) example geometries; wraps ``core.pipeline.run_search``."""

    ALGORITHM_ID = "search"
    DISPLAY_NAME = "Search similar tiles"
    SUMMARY = (
        "Reads a chip under each example geometry from the query raster, embeds it with the index's "
        "encoder and returns the k indexed tiles most similar to the examples (and least similar to "
        "the negative examples) as polygons with rank and score. A point queries the tile centred on "
        "it; a polygon larger than one tile queries every tile it covers. Tiles that overlap the area "
        "read for an example are always left out, and MAX_OVERLAP sets how much the matches may "
        "overlap each other."
    )

    VALUE_HINTS = {
        "K": "K is the maximum number of matches returned.",
        "MIN_SCORE": "The score is the cosine similarity of embeddings: 1 is identical, 0 unrelated.",
        "MAX_OVERLAP": (
            "It is a fraction of the smaller footprint, not a percentage: 0 allows no overlap "
            "between matches and 1 turns the suppression off."
        ),
    }

    INDEX = "INDEX"
    POSITIVES = "POSITIVES"
    NEGATIVES = "NEGATIVES"
    RASTER = "RASTER"
    ENCODER = "ENCODER"
    K = "K"
    MIN_SCORE = "MIN_SCORE"
    MAX_OVERLAP = "MAX_OVERLAP"
    STRATEGY = "STRATEGY"
    OUTPUT = "OUTPUT"
    MATCH_COUNT = "MATCH_COUNT"
    BEST_SCORE = "BEST_SCORE"

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802 - QGIS API
        index = QgsProcessingParameterFile(self.INDEX, tr("Index folder"), QgsProcessingParameterFile.Folder)
        index.setHelp(tr("Folder written by 'Build similarity index' (it contains manifest.json)."))
        self.addParameter(index)

        geometry_types = [QgsProcessing.TypeVectorPolygon, QgsProcessing.TypeVectorPoint]
        positives = QgsProcessingParameterFeatureSource(self.POSITIVES, tr("Examples to find"), geometry_types)
        positives.setHelp(tr(
            "Points or polygons over objects like the ones to find; every feature is an example (use "
            "'Selected features only' to pick some). Their CRS may differ from the raster's."
        ))
        self.addParameter(positives)

        negatives = QgsProcessingParameterFeatureSource(
            self.NEGATIVES, tr("Counter-examples (not wanted)"), geometry_types, optional=True
        )
        negatives.setHelp(tr(
            "Points or polygons over things that came back but are not wanted; matches that look "
            "like them are ranked lower."
        ))
        self.addParameter(negatives)

        raster = QgsProcessingParameterRasterLayer(self.RASTER, tr("Raster to read the examples from"), optional=True)
        raster.setHelp(tr(
            "Raster under the examples, read by GDAL. Empty uses the first raster of the index. Any "
            "raster works, but one that is in the index is read with the index's value stretch."
        ))
        self.addParameter(raster)

        encoder = QgsProcessingParameterFile(self.ENCODER, tr("Encoder (ONNX model)"), extension="onnx", optional=True)
        encoder.setHelp(tr(
            "The ONNX file the index was built with. Empty uses the bundled EfficientNet-Lite0; an "
            "index built with another encoder rejects it with the name of the one it needs."
        ))
        self.addParameter(encoder)

        k = QgsProcessingParameterNumber(
            self.K, tr("Number of matches (k)"), QgsProcessingParameterNumber.Integer,
            defaultValue=DEFAULT_K, minValue=1,
        )
        k.setHelp(tr("Maximum number of matches returned. Fewer come back when the index has fewer tiles left."))
        self.addParameter(k)

        min_score = QgsProcessingParameterNumber(
            self.MIN_SCORE, tr("Minimum score"), QgsProcessingParameterNumber.Double, optional=True,
            minValue=-2.0, maxValue=1.0,
        )
        min_score.setHelp(tr(
            "Matches scoring below this are dropped. The score is the cosine similarity of embeddings "
            "(1 is identical, 0 unrelated); with counter-examples and the 'max' strategy it can drop "
            "below -1. Empty keeps the k best whatever their score."
        ))
        self.addParameter(min_score)

        max_overlap = QgsProcessingParameterNumber(
            self.MAX_OVERLAP, tr("Maximum overlap between matches (fraction)"), QgsProcessingParameterNumber.Double,
            defaultValue=DEFAULT_MAX_OVERLAP, minValue=0.0, maxValue=1.0,
        )
        max_overlap.setHelp(tr(
            "A tile is dropped when it overlaps a better-ranked match by more than this fraction of "
            f"the smaller of the two footprints (0 to 1, default {DEFAULT_MAX_OVERLAP:g}). 0 keeps only "
            "matches that do not overlap each other (sharing an edge is allowed); 1 turns this "
            "suppression off. Tiles that overlap the area read for an example are left out whatever "
            "this value, so the examples do not find themselves."
        ))
        self.addParameter(max_overlap)

        strategy = QgsProcessingParameterEnum(
            self.STRATEGY, tr("How several examples combine"), options=list(STRATEGIES),
            defaultValue=STRATEGIES.index(DEFAULT_STRATEGY),
        )
        strategy.setHelp(tr(
            "0 mean: one query, the average of the examples minus half the average counter-example; "
            "best when the examples show one kind of object. 1 max: a tile scores by the example it "
            "resembles most; best when the examples differ (e.g. ships moored and under way)."
        ))
        self.addParameter(strategy)

        output = QgsProcessingParameterFeatureSink(self.OUTPUT, tr("Matches"), QgsProcessing.TypeVectorPolygon)
        output.setHelp(tr(
            "Tile footprints, best first, with the fields rank, score, tile_id, source (raster path), "
            "row, col, encoder and query, in the CRS of the index's first tile grid."
        ))
        self.addParameter(output)

        self.addOutput(QgsProcessingOutputNumber(self.MATCH_COUNT, tr("Number of matches")))
        self.addOutput(QgsProcessingOutputNumber(self.BEST_SCORE, tr("Score of the best match")))

    def processAlgorithm(  # noqa: N802 - QGIS API
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict[str, Any]:
        require_packages(ENCODER_PACKAGES + INDEX_PACKAGES)
        index_folder = self.parameterAsFile(parameters, self.INDEX, context)
        with core_errors(PARAMETER_NAMES):
            index = TileIndex.open(index_folder)
        if not index.sources:
            raise QgsProcessingException(
                tr(f"The index {index_folder} has no rasters yet; build it with 'Build similarity index' first.")
            )
        grid_crs = QgsCoordinateReferenceSystem.fromWkt(index.sources[0]["grid"]["crs_wkt"])
        raster_path = self._raster_path(parameters, context, index)

        positives_source = self._source(parameters, self.POSITIVES, context)
        query_crs = positives_source.sourceCrs()
        query_crs_wkt = crs_wkt(query_crs, self.POSITIVES)
        positives = self._geometries(positives_source, self.POSITIVES, query_crs, context)
        if not positives:
            raise QgsProcessingException(
                tr(f"{self.POSITIVES} has no feature with a geometry; draw or select at least one example.")
            )
        negatives_source = self._source(parameters, self.NEGATIVES, context, optional=True)
        negatives = []
        if negatives_source is not None:
            negatives = self._geometries(negatives_source, self.NEGATIVES, query_crs, context)

        min_score = None
        if parameters.get(self.MIN_SCORE) not in (None, ""):
            min_score = self.parameterAsDouble(parameters, self.MIN_SCORE, context)
        feedback.pushInfo(tr(
            f"Searching {index_folder} ({index.count} tiles) with {len(positives)} example(s) and "
            f"{len(negatives)} counter-example(s) read from {raster_path}"
        ))
        set_progress(feedback, 5, 100)
        if feedback.isCanceled():
            return {}

        with core_errors(PARAMETER_NAMES):
            found = run_search(
                index_folder,
                raster_path,
                positives,
                negatives,
                k=self.parameterAsInt(parameters, self.K, context),
                crs_wkt=query_crs_wkt,
                encoder_path=self.parameterAsFile(parameters, self.ENCODER, context) or None,
                max_overlap=self.parameterAsDouble(parameters, self.MAX_OVERLAP, context),
                min_score=min_score,
                strategy=STRATEGIES[self.parameterAsEnum(parameters, self.STRATEGY, context)],
            )
        set_progress(feedback, 80, 100)
        if feedback.isCanceled():
            return {}

        fields = match_layers.match_fields()
        sink, sink_id = self.parameterAsSink(
            parameters, self.OUTPUT, context, fields, POLYGON_WKB_TYPE, grid_crs
        )
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        query_label = _query_label(positives_source, len(positives), negatives_source, len(negatives))
        with core_errors(PARAMETER_NAMES):
            features = match_layers.matches_to_features(
                found, fields, grid_crs,
                encoder_name=index.encoder_info.get("name", ""),
                query_label=query_label,
                transform_context=context.transformContext(),
            )
        for feature in features:
            sink.addFeature(feature, QgsFeatureSink.FastInsert)
        set_progress(feedback, 100, 100)

        if found:
            feedback.pushInfo(tr(f"{len(found)} matches, scores {found[0].score:.3f} to {found[-1].score:.3f}."))
        else:
            feedback.pushWarning(tr("No match: the index is empty or every tile was below the minimum score."))
        return {
            self.OUTPUT: sink_id,
            self.MATCH_COUNT: len(found),
            self.BEST_SCORE: found[0].score if found else None,
        }

    def _raster_path(self, parameters: dict, context: QgsProcessingContext, index: TileIndex) -> str:
        if parameters.get(self.RASTER):
            return gdal_source_path(self.parameterAsRasterLayer(parameters, self.RASTER, context), self.RASTER)
        return str(index.sources[0]["path"])

    def _source(
        self, parameters: dict, name: str, context: QgsProcessingContext, optional: bool = False
    ) -> Optional[QgsFeatureSource]:
        source = self.parameterAsSource(parameters, name, context)
        if source is None and not optional:
            raise QgsProcessingException(self.invalidSourceError(parameters, name))
        return source

    def _geometries(
        self,
        source: QgsFeatureSource,
        name: str,
        query_crs: QgsCoordinateReferenceSystem,
        context: QgsProcessingContext,
    ) -> list[str]:
        """Return the WKT of every feature's geometry in ``query_crs``, the one CRS run_search takes."""
        transform = None
        if source.sourceCrs() != query_crs:
            transform = QgsCoordinateTransform(source.sourceCrs(), query_crs, context.transformContext())
        geometries = []
        for feature in source.getFeatures():
            geometry = feature.geometry()
            if geometry is None or geometry.isEmpty():
                continue
            if transform is not None:
                try:
                    geometry.transform(transform)
                except QgsCsException as error:
                    raise QgsProcessingException(tr(
                        f"Feature {feature.id()} of {name} cannot be reprojected to the CRS of "
                        f"{self.POSITIVES} ({query_crs.authid()}): {error}."
                    )) from error
            geometries.append(geometry_wkt(geometry))
        return geometries


def _query_label(
    positives: QgsFeatureSource, positive_count: int, negatives: Optional[QgsFeatureSource], negative_count: int
) -> str:
    label = f"{positive_count} example(s) from {positives.sourceName()}"
    if negatives is not None and negative_count:
        label += f", {negative_count} counter-example(s) from {negatives.sourceName()}"
    return label
