"""``lookalike:search``: find the tiles of an index that look like example geometries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsDataSourceUri,
    QgsFeatureSink,
    QgsFeatureSource,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingUtils,
    QgsProviderRegistry,
    QgsVectorFileWriter,
    QgsWkbTypes,
)

from ..core.encoder import OnnxEncoder
from ..core.errors import CancelledError, GridError, LookalikeError, SearchError, SearchIndexError
from ..core.index import TileIndex
from ..core.pipeline import (
    QueryChips,
    embed_query,
    index_encoder_path,
    indexed_source_for_geometry,
    search_query_chips,
)
from ..core.query import changed_source_warnings, valid_region_wkt
from ..core.search import (
    DEFAULT_MAX_OVERLAP,
    DEFAULT_STRATEGY,
    NEGATIVES_WITHOUT_EFFECT_MESSAGE,
    STRATEGIES,
    Match,
    example_embeddings,
    negative_example_warnings,
)
from ..gis import matches as match_layers
from .compat import FILE_FOLDER, NUMBER_DOUBLE, NUMBER_INTEGER, SOURCE_VECTOR_POINT, SOURCE_VECTOR_POLYGON
from .support import (
    ENCODER_FILE_FILTER,
    ENCODER_PACKAGES,
    INDEX_PACKAGES,
    LookalikeAlgorithm,
    cancel_check,
    core_errors,
    crs_wkt,
    features_of,
    gdal_source_path,
    geometry_wkt,
    reject_output_in_any_index,
    reject_output_in_folder,
    require_packages,
    same_file,
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
# The k box of the Lookalike panel stops at the same number. Without a maximum, QGIS's integer
# conversion turned values past 2**31 into k=0 or other numbers the user never gave.
MAX_K = 10000


# OGR drivers whose files hold several layers, so that a match layer can be added to one.
MULTI_LAYER_DRIVERS = frozenset({"GPKG"})
# The formats search writes to a file: QGIS writes each under the name given, and the files it
# replaces are known (see gis.matches.files_replaced).
OUTPUT_FILE_EXTENSIONS = (".gpkg", ".shp", ".geojson", ".fgb", ".csv")


@dataclass
class _Examples:
    """The example geometries as WKT in ``crs_wkt``, with the raster path each one is read from."""

    positives_source: QgsFeatureSource
    negatives_source: Optional[QgsFeatureSource]
    positives: list[str]
    negatives: list[str]
    positive_sources: list[str]
    negative_sources: list[str]
    crs_wkt: str
    # The feature id of each geometry, for messages that name the example at fault.
    positive_ids: list[int] = field(default_factory=list)
    negative_ids: list[int] = field(default_factory=list)
    # True when RASTER names the raster to read, which is then read alone.
    raster_chosen: bool = False
    # Features left out because they have no geometry, by parameter name.
    without_geometry: dict[str, int] = field(default_factory=dict)


class SearchAlgorithm(LookalikeAlgorithm):
    """Query an index with positive (and negative) example geometries.

    Each example is embedded with ``core.pipeline.embed_query`` from its own raster, and the
    index is ranked with ``core.search.search``, as the Lookalike panel does. ``run_search``
    reads every example from one raster, which fails for examples over different rasters.
    """

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
        "MIN_SCORE": ("The score is the cosine similarity of embeddings: 1 is identical. Unrelated tiles score well "
                      "above 0, so take a threshold from the scores of a first search."),
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
        index = QgsProcessingParameterFile(self.INDEX, tr("Index folder"), FILE_FOLDER)
        index.setHelp(tr("Folder written by 'Build similarity index' (it contains manifest.json)."))
        self.addParameter(index)

        geometry_types = [SOURCE_VECTOR_POLYGON, SOURCE_VECTOR_POINT]
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
            "Raster under the examples, read by GDAL. Empty reads each example from the indexed raster "
            "under it (the one that contains its centre, else the one it overlaps most). Any raster "
            "works, but one that is in the index is read with the index's value stretch."
        ))
        self.addParameter(raster)

        encoder = QgsProcessingParameterFile(self.ENCODER, tr("Encoder (ONNX model)"), optional=True,
                                             fileFilter=ENCODER_FILE_FILTER)
        encoder.setHelp(tr(
            "The ONNX file the index was built with. Empty uses the encoder file recorded in the "
            "index. When that file no longer exists, the bundled EfficientNet-Lite0 is used if the "
            "index was built with it; otherwise the search stops and names the missing file. Another "
            "encoder than the index's is rejected with the name of the one it needs."
        ))
        self.addParameter(encoder)

        k = QgsProcessingParameterNumber(
            self.K, tr("Number of matches (k)"), NUMBER_INTEGER,
            defaultValue=DEFAULT_K, minValue=1, maxValue=MAX_K,
        )
        k.setHelp(tr(
            f"Maximum number of matches returned, a whole number from 1 to {MAX_K}. Fewer come back when "
            "the index has no other tile left: tiles that overlap an example or a better-ranked match by more "
            "than MAX_OVERLAP, or score below MIN_SCORE, are left out."
        ))
        self.addParameter(k)

        min_score = QgsProcessingParameterNumber(
            self.MIN_SCORE, tr("Minimum score"), NUMBER_DOUBLE, optional=True,
            minValue=-2.0, maxValue=1.0,
        )
        min_score.setHelp(tr(
            "Matches scoring below this are dropped. The score is the cosine similarity of embeddings "
            "(1 is identical). The bundled encoder's embeddings have no negative values, so unrelated tiles "
            "still score well above 0, and how far depends on the imagery: take a threshold from the scores "
            "of a first search. With counter-examples and the 'max' strategy the score can drop below -1. "
            "Empty keeps the k best whatever their score."
        ))
        self.addParameter(min_score)

        max_overlap = QgsProcessingParameterNumber(
            self.MAX_OVERLAP, tr("Maximum overlap between matches (fraction)"), NUMBER_DOUBLE,
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

        output = QgsProcessingParameterFeatureSink(self.OUTPUT, tr("Matches"), SOURCE_VECTOR_POLYGON)
        output.setHelp(tr(
            "Tile footprints, best first, with the fields rank, score, tile_id, source (raster path), "
            "row, col, encoder and query, in the CRS of the index's first tile grid. Written as GeoPackage, "
            "shapefile, GeoJSON, FlatGeobuf or CSV. An existing file is replaced only when it holds nothing but "
            "match layers of an earlier search."
        ))
        self.addParameter(output)

        self.addOutput(QgsProcessingOutputNumber(self.MATCH_COUNT, tr("Number of matches")))
        self.addOutput(QgsProcessingOutputNumber(self.BEST_SCORE, tr("Score of the best match")))

    def processAlgorithm(  # noqa: N802 - QGIS API
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict[str, Any]:
        require_packages(ENCODER_PACKAGES + INDEX_PACKAGES)
        index_folder = self.parameterAsFile(parameters, self.INDEX, context)
        # Checked before anything runs, because the sink replaces its file when it is created.
        self._check_output(parameters, context, index_folder)
        with core_errors(PARAMETER_NAMES):
            index = TileIndex.open(index_folder)
        if not index.sources:
            raise QgsProcessingException(
                tr(f"The index {index_folder} has no rasters yet; build it with 'Build similarity index' first.")
            )
        grid_crs = QgsCoordinateReferenceSystem.fromWkt(index.sources[0]["grid"]["crs_wkt"])
        examples = self._read_examples(parameters, context, index)
        source_names = ", ".join(sorted(set(examples.positive_sources + examples.negative_sources)))
        feedback.pushInfo(tr(
            f"Searching {index_folder} ({index.count} tiles) with {len(examples.positives)} example(s) and "
            f"{len(examples.negatives)} counter-example(s) read from {source_names}"
        ))
        for name, count in examples.without_geometry.items():
            if count:
                feedback.pushWarning(tr(
                    f"{count} feature(s) of {name} have no geometry and were left out; the search uses the others."
                ))
        for warning in changed_source_warnings(index):
            feedback.pushWarning(warning)
        set_progress(feedback, 5, 100)
        if feedback.isCanceled():
            return {}

        min_score = None
        if parameters.get(self.MIN_SCORE) not in (None, ""):
            min_score = self.parameterAsDouble(parameters, self.MIN_SCORE, context)
        found, best_score = self._rank_tiles(parameters, context, feedback, index, examples, min_score)
        set_progress(feedback, 80, 100)
        if feedback.isCanceled():
            return {}

        # Checked again: another program may have written that file while the search ran.
        self._check_output(parameters, context, index_folder)
        fields = match_layers.match_fields()
        output_path = _destination_file(self.parameterAsOutputLayer(parameters, self.OUTPUT, context)).path
        layer_options = list(match_layers.CSV_LAYER_OPTIONS) if output_path.lower().endswith(".csv") else []
        sink, sink_id = self.parameterAsSink(
            parameters, self.OUTPUT, context, fields, POLYGON_WKB_TYPE, grid_crs, layerOptions=layer_options
        )
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        query_label = _query_label(
            examples.positives_source, len(examples.positives), examples.negatives_source, len(examples.negatives)
        )
        with core_errors(PARAMETER_NAMES):
            features = match_layers.matches_to_features(
                found, fields, grid_crs,
                encoder_name=index.encoder_info.get("name", ""),
                query_label=query_label,
                transform_context=context.transformContext(),
            )
        for feature in features:
            sink.addFeature(feature, QgsFeatureSink.Flag.FastInsert)
        set_progress(feedback, 100, 100)

        if found:
            if len(found) == 1:
                feedback.pushInfo(tr(f"1 match, score {found[0].score:.3f}."))
            else:
                feedback.pushInfo(tr(f"{len(found)} matches, scores {found[0].score:.3f} to {found[-1].score:.3f}."))
            k = self.parameterAsInt(parameters, self.K, context)
            if len(found) < k:
                feedback.pushWarning(_fewer_than_k_message(
                    len(found), k, self.parameterAsDouble(parameters, self.MAX_OVERLAP, context), min_score
                ))
        else:
            feedback.pushWarning(_no_match_message(index.count, min_score, best_score))
        return {
            self.OUTPUT: _written_spelling(sink_id),
            self.MATCH_COUNT: len(found),
            self.BEST_SCORE: found[0].score if found else None,
        }

    def _read_examples(self, parameters: dict, context: QgsProcessingContext, index: TileIndex) -> _Examples:
        """Read the example geometries in the CRS of POSITIVES and choose the raster each is read from."""
        positives_source = self._source(parameters, self.POSITIVES, context)
        query_crs = positives_source.sourceCrs()
        # The geometries are read before the CRS is checked: QGIS reports no CRS for a GeoJSON
        # file without features, and the missing examples are then the problem to report.
        positive_ids, positives, feature_count = self._geometries(positives_source, self.POSITIVES, query_crs, context)
        if not positives:
            raise QgsProcessingException(_no_examples_message(self.POSITIVES, positives_source, feature_count))
        query_crs_wkt = crs_wkt(query_crs, self.POSITIVES)
        negatives_source = self._source(parameters, self.NEGATIVES, context, optional=True)
        negative_ids: list[int] = []
        negatives: list[str] = []
        without_geometry = {self.POSITIVES: feature_count - len(positives)}
        if negatives_source is not None:
            negative_ids, negatives, negative_count = self._geometries(
                negatives_source, self.NEGATIVES, query_crs, context
            )
            without_geometry[self.NEGATIVES] = negative_count - len(negatives)

        raster_path = self._raster_path(parameters, context)
        with core_errors(PARAMETER_NAMES):
            positive_sources = _for_each_example(
                self.POSITIVES, positive_ids, positives,
                lambda wkt: raster_path or indexed_source_for_geometry(index, wkt, query_crs_wkt),
            )
            negative_sources = _for_each_example(
                self.NEGATIVES, negative_ids, negatives,
                lambda wkt: raster_path or indexed_source_for_geometry(index, wkt, query_crs_wkt),
            )
        return _Examples(
            positives_source=positives_source,
            negatives_source=negatives_source,
            positives=positives,
            negatives=negatives,
            positive_sources=positive_sources,
            negative_sources=negative_sources,
            crs_wkt=query_crs_wkt,
            positive_ids=positive_ids,
            negative_ids=negative_ids,
            raster_chosen=raster_path is not None,
            without_geometry=without_geometry,
        )

    def _rank_tiles(
        self,
        parameters: dict,
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
        index: TileIndex,
        examples: _Examples,
        min_score: Optional[float],
    ) -> tuple[list[Match], Optional[float]]:
        """Embed the examples and search the index.

        Returns the matches and, when MIN_SCORE left none, the best score without it (None when
        no tile is left even then).
        """
        encoder_path = self._encoder_path(parameters, context, index)
        strategy = STRATEGIES[self.parameterAsEnum(parameters, self.STRATEGY, context)]
        with core_errors(PARAMETER_NAMES):
            encoder = OnnxEncoder(encoder_path)
            index.check_encoder(encoder.name, encoder.checksum)
            # A RASTER chosen by the analyst is read alone, not completed from the indexed rasters.
            complete = not examples.raster_chosen
            positive_chips = _embed_examples(index, encoder, self.POSITIVES, examples.positive_ids,
                                             examples.positive_sources, examples.positives, examples.crs_wkt,
                                             feedback, complete)
            negative_chips = _embed_examples(index, encoder, self.NEGATIVES, examples.negative_ids,
                                             examples.negative_sources, examples.negatives, examples.crs_wkt,
                                             feedback, complete)
            # Judged on the rows the search combines: one per example with the mean strategy.
            positive_rows = example_embeddings([chips.embeddings for chips in positive_chips])
            negative_rows = example_embeddings([chips.embeddings for chips in negative_chips])
            for warning in negative_example_warnings(positive_rows, negative_rows, strategy):
                if warning == NEGATIVES_WITHOUT_EFFECT_MESSAGE:
                    warning += tr(f" With {self.STRATEGY} max, a negative demotes only the tiles that look like it.")
                feedback.pushWarning(warning)
            found = search_query_chips(
                index,
                positive_chips,
                negative_chips,
                k=self.parameterAsInt(parameters, self.K, context),
                max_overlap=self.parameterAsDouble(parameters, self.MAX_OVERLAP, context),
                min_score=min_score,
                strategy=strategy,
            )
            if found or min_score is None or not index.count:
                return found, None
            # A search without the minimum score shows which of the two filters removed every tile.
            unfiltered = search_query_chips(index, positive_chips, negative_chips, k=1, strategy=strategy)
        return found, (unfiltered[0].score if unfiltered else None)

    def _raster_path(self, parameters: dict, context: QgsProcessingContext) -> Optional[str]:
        """Return the GDAL path of RASTER, or None when each example is read from its indexed raster."""
        if parameters.get(self.RASTER):
            return gdal_source_path(self.parameterAsRasterLayer(parameters, self.RASTER, context), self.RASTER)
        return None

    def _encoder_path(self, parameters: dict, context: QgsProcessingContext, index: TileIndex) -> str:
        """Return ENCODER, else the encoder file the index records, else the bundled one when it fits."""
        chosen_path = self.parameterAsFile(parameters, self.ENCODER, context)
        if chosen_path:
            return chosen_path
        try:
            return str(index_encoder_path(index))
        except SearchIndexError as error:
            recorded = index.build_parameters.get("encoder_path")
            raise QgsProcessingException(tr(
                f"The index was built with the encoder file {recorded} (encoder "
                f"'{index.encoder_info.get('name', '')}'), which no longer exists. Set {self.ENCODER} to "
                "that ONNX file where it is now, or rebuild the index."
            )) from error

    def _check_output(self, parameters: dict, context: QgsProcessingContext, index_folder: str) -> None:
        """Reject an OUTPUT file that would replace the file of POSITIVES or NEGATIVES, or an index file."""
        typed_output = parameters.get(self.OUTPUT)
        if isinstance(typed_output, QgsProcessingOutputLayerDefinition):
            typed_output = typed_output.sink.staticValue()
        if isinstance(typed_output, str) and typed_output and _is_folder(typed_output):
            # QGIS would add .gpkg and write beside the folder instead of into it.
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {typed_output} is a folder; give the name of a file to write the matches to, such "
                f"as {Path(typed_output) / 'matches.gpkg'}."
            ))
        destination = _destination_file(self.parameterAsOutputLayer(parameters, self.OUTPUT, context))
        output_path = destination.path
        if not output_path:
            return
        try:
            self._check_output_file(parameters, context, index_folder, destination)
        except OSError as error:
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} cannot be checked ({error.strerror or error}); choose another "
                "output file."
            )) from error

    def _check_output_file(
        self, parameters: dict, context: QgsProcessingContext, index_folder: str, destination: _Destination
    ) -> None:
        output_path, output_layer = destination.path, destination.layer
        extension = Path(output_path).suffix.lower()
        if extension not in OUTPUT_FILE_EXTENSIONS:
            # Other formats write files beside the one named (MapInfo, PDS4) or under another name
            # (QGIS 3.22 writes m.json as m.json.geojson), which this check could not protect.
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} is not a format Lookalike writes matches to; give a file ending in "
                f"{', '.join(OUTPUT_FILE_EXTENSIONS)}, or convert the matches afterwards."
            ))
        if destination.is_ogr_uri and output_layer and extension != ".gpkg":
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: Lookalike adds a layer only to a GeoPackage (.gpkg), not to {output_path}. Give "
                "a GeoPackage, or the file's path itself."
            ))
        folder = Path(output_path).parent
        if not folder.is_dir():
            # Found now, not after the search: QGIS creates the output file only at the end.
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: the folder {folder} does not exist; create it or choose an output file in "
                "another folder."
            ))
        reject_output_in_folder(output_path, self.OUTPUT, index_folder, self.INDEX)
        reject_output_in_any_index(output_path, self.OUTPUT)
        for name in (self.POSITIVES, self.NEGATIVES):
            input_path, input_layer = self._input_file(parameters, name, context)
            if not input_path or not same_file(input_path, output_path):
                continue
            # GeoPackage layer names ignore letter case.
            if output_layer and input_layer and output_layer.lower() != input_layer.lower():
                # Another layer of the same GeoPackage leaves the examples' layer in place.
                continue
            if output_layer and output_layer.lower() != _first_layer_name(input_path).lower():
                # QGIS 3.22 failed to load the new layer after writing it into the GeoPackage that
                # it read the examples from without a layer name.
                raise QgsProcessingException(tr(
                    f"{self.OUTPUT}: {output_path} is the file {name} is read from. To add the matches to it as a "
                    f"layer, give {name} with its layer name ({output_path}|layername=...). Otherwise choose "
                    "another output file."
                ))
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} is the file of {name}, and writing the matches there "
                "would replace the examples. Choose another output file."
            ))
        self._reject_replacing_user_data(destination)

    def _reject_replacing_user_data(self, destination: _Destination) -> None:
        """Reject an OUTPUT that would replace a file or layer that is not a Lookalike match layer.

        Processing replaces an existing file whole, every layer of a GeoPackage included, and
        qgis_process cannot ask first. Match layers of an earlier search may be replaced.
        """
        output_path, output_layer = destination.path, destination.layer
        if Path(output_path).is_dir():
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} is a folder; give the name of a file to write the matches to."
            ))
        sharing = match_layers.dataset_sharing_files(output_path)
        if sharing is not None:
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: writing {output_path} would replace {Path(output_path).with_suffix('.prj').name}, "
                f"the CRS file that {sharing} uses too. Choose another output file name."
            ))
        replaced = match_layers.files_replaced(output_path)
        if not replaced:
            return
        if not Path(output_path).is_file():
            # Only other files of the shapefile exist, such as a .dbf of that name.
            names = ", ".join(str(path) for path in replaced)
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: writing {output_path} would replace {names}, which Lookalike did not write. Choose "
                "another output file."
            ))
        driver = _driver_name(output_path)
        if not driver:
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} exists but cannot be opened: another program may hold it locked, "
                "or it is damaged or no vector file. Close it elsewhere, or choose another output file."
            ))
        adds_layers = driver in MULTI_LAYER_DRIVERS
        if destination.is_ogr_uri and not adds_layers:
            # QGIS 3.22 deleted a shapefile given as an ogr: URI and then failed to write the layer.
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} exists, and Lookalike adds a layer only to a GeoPackage (.gpkg), not "
                f"to a file in the {driver} format. Give a new file name, or the file's path itself to replace a "
                "match layer an earlier search wrote there."
            ))
        if output_layer and adds_layers:
            foreign = match_layers.layers_not_from_lookalike(output_path, output_layer)
            if foreign:
                raise QgsProcessingException(tr(
                    f"{self.OUTPUT}: the layer '{foreign[0]}' of {output_path} is not a Lookalike match layer, and "
                    f"writing the matches as '{output_layer}' would replace it. Choose another layer name."
                ))
            return
        foreign = match_layers.layers_not_from_lookalike(output_path)
        if foreign is None:
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} exists and is not a vector file that Lookalike wrote, so writing "
                "the matches would replace it. Choose another output file, or delete that file first."
            ))
        if foreign:
            advice = "Choose another output file."
            # QGIS 3.22 takes the driver from everything after the first dot, so a.b.gpkg fails as an ogr: URI.
            if adds_layers and Path(output_path).name.count(".") == 1:
                advice = ("Choose another output file, or add the matches to this one as a new layer with this "
                          f"OUTPUT: {_ogr_uri(output_path, match_layers.free_layer_name(output_path))}")
            raise QgsProcessingException(tr(
                f"{self.OUTPUT}: {output_path} contains layers or fields that Lookalike did not write "
                f"({', '.join(foreign)}), and writing the matches replaces the whole file. {advice}"
            ))

    def _input_file(self, parameters: dict, name: str, context: QgsProcessingContext) -> tuple[str, str]:
        """Return the file and layer name a feature source parameter reads, or empty strings for other layers."""
        value = parameters.get(name)
        if value is None or value == "":
            return "", ""
        if isinstance(value, QgsProcessingFeatureSourceDefinition):
            value, _ = value.source.valueAsString(context.expressionContext(), "")
        layer = self.parameterAsVectorLayer({name: value}, name, context)
        if layer is None:
            return "", ""
        parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
        path = parts.get("path")
        layer_name = parts.get("layerName")
        return (path if isinstance(path, str) else ""), (layer_name if isinstance(layer_name, str) else "")

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
    ) -> tuple[list[int], list[str], int]:
        """Return the ids and WKT (in ``query_crs``) of the features with a geometry, and the features read."""
        transform = None
        if source.sourceCrs() != query_crs:
            transform = QgsCoordinateTransform(source.sourceCrs(), query_crs, context.transformContext())
        feature_ids = []
        geometries = []
        feature_count = 0
        for feature in features_of(source):
            feature_count += 1
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
            wkt = geometry_wkt(geometry)
            try:
                valid_region_wkt(wkt)
            except (SearchError, GridError) as error:
                # Named here, because the search itself cannot tell which feature it came from.
                raise QgsProcessingException(tr(f"Feature {feature.id()} of {name}: {error}")) from error
            feature_ids.append(int(feature.id()))
            geometries.append(wkt)
        return feature_ids, geometries, feature_count


def _embed_examples(
    index: TileIndex,
    encoder: OnnxEncoder,
    parameter_name: str,
    feature_ids: list[int],
    sources: list[str],
    geometries: list[str],
    crs_wkt: str,
    feedback: QgsProcessingFeedback,
    complete_from_index: bool = True,
) -> list[QueryChips]:
    """Embed each example geometry from the raster given for it. A core error names the feature it came from."""
    pairs = list(zip(sources, geometries))
    return _for_each_example(
        parameter_name, feature_ids, pairs,
        lambda pair: embed_query(index, encoder, pair[0], pair[1], crs_wkt, is_cancelled=cancel_check(feedback),
                                 complete_from_index=complete_from_index),
    )


def _for_each_example(parameter_name: str, feature_ids: list[int], items: list, action: Callable[[Any], Any]) -> list:
    """Return ``action`` of each item; a core error names the feature of ``parameter_name`` it came from."""
    results = []
    for feature_id, item in zip(feature_ids, items):
        try:
            results.append(action(item))
        except (CancelledError, SearchIndexError):
            # Neither is about the feature: the run was cancelled, or the index cannot be searched.
            raise
        except LookalikeError as error:
            raise LookalikeError(f"Feature with id {feature_id} in {parameter_name}: {error}") from error
    return results


def _first_layer_name(path: str) -> str:
    """Return the name of the layer QGIS opens for a vector file given without a layer name."""
    dataset = match_layers.open_dataset_quietly(path)
    if dataset is None or dataset.GetLayerCount() == 0:
        return ""
    return dataset.GetLayer(0).GetName()


class _Destination(NamedTuple):
    """The file and layer a sink destination writes; ``path`` is empty for memory and databases."""

    path: str
    layer: str = ""
    # True for an "ogr:" URI, which QGIS opens in place instead of replacing the file.
    is_ogr_uri: bool = False


def _destination_file(destination: str) -> _Destination:
    """Return the file and layer name a sink destination writes.

    The file is the one QGIS writes: a path without the extension of a vector format gets the
    default one (``.gpkg``), so ``matches`` and ``r.tif`` become ``matches.gpkg`` and ``r.tif.gpkg``.
    """
    if destination.startswith("ogr:"):
        uri_text = destination[len("ogr:"):]
        if "dbname=" not in uri_text:
            # "ogr:/path/file.gpkg|layername=name", the form QGIS gives its own OGR layers.
            path, _, options = uri_text.partition("|")
            layer = options.partition("layername=")[2].split("|")[0] if "layername=" in options else ""
            return _Destination(path, layer, is_ogr_uri=True)
        uri = QgsDataSourceUri(uri_text)
        return _Destination(uri.database(), uri.table(), is_ogr_uri=True)
    # Provider prefixes such as "memory:" or "postgres:" name no file.
    prefix = destination.split(":", 1)[0]
    if ":" in destination and prefix in QgsProviderRegistry.instance().providerList():
        return _Destination("")
    extension = Path(destination).suffix[1:]
    driver = QgsVectorFileWriter.driverForExtension(extension) if extension else ""
    if not driver:
        destination = f"{destination}.{QgsProcessingUtils.defaultVectorExtension()}"
    elif driver == "ESRI Shapefile" and extension.lower() != "shp":
        # QGIS 3.22 writes "name.shz" as the shapefile "name.shz.shp".
        destination = f"{destination}.shp"
    return _Destination(destination)


def _driver_name(path: str) -> str:
    """Return the GDAL driver of the existing file ``path``, vector or raster, or an empty string."""
    dataset = match_layers.open_dataset_quietly(path, gdal.OF_VECTOR | gdal.OF_RASTER)
    return dataset.GetDriver().ShortName if dataset is not None else ""


def _ogr_uri(path: str, table: str) -> str:
    """Return an ``ogr:`` destination that writes ``table`` into ``path``, quoted as QGIS parses it."""
    quoted = path.replace("\\", "\\\\").replace("'", "\\'")
    return f"ogr:dbname='{quoted}' table=\"{table}\" (geom)"


def _no_examples_message(name: str, source: QgsFeatureSource, feature_count: int) -> str:
    if feature_count == 0:
        return tr(
            f"{name} ({source.sourceName()}) has no features, so there is no example to search with; "
            "add or select at least one point or polygon over an object like the ones to find."
        )
    return tr(
        f"{name} ({source.sourceName()}) has {feature_count} feature(s) but none has a geometry, so there "
        "is no example to search with; give points or polygons over objects like the ones to find."
    )


def _fewer_than_k_message(found_count: int, k: int, max_overlap: float, min_score: Optional[float]) -> str:
    # The search widens until k matches survive, so fewer means that no tile is left to try.
    below_score = f", or scores below MIN_SCORE {min_score:g}" if min_score is not None else ""
    if max_overlap >= 1.0:
        # The overlap rule between matches is off, so only the examples' own tiles and the score are left.
        return tr(
            f"The search found {found_count} of the K={k} matches asked for: every other tile of the index "
            f"overlaps an example, and tiles under an example are never returned{below_score}."
        )
    return tr(
        f"The search found {found_count} of the K={k} matches asked for: every other tile of the index overlaps "
        f"an example, or a better-ranked match by more than MAX_OVERLAP {max_overlap:g}{below_score}. Raise "
        "MAX_OVERLAP (1 turns the overlap rule off) to get more matches of the same places."
    )


def _no_match_message(tile_count: int, min_score: Optional[float], best_score: Optional[float]) -> str:
    """Explain an empty result; ``best_score`` is the best score without MIN_SCORE, when one was set."""
    if tile_count == 0:
        return tr("No match: the index contains no tiles, because every tile was skipped when it was built.")
    if min_score is not None and best_score is not None:
        return tr(
            f"No match: no tile scored at least MIN_SCORE={min_score:g}, and the best one scored "
            f"{best_score:.3f}. Lower MIN_SCORE or leave it empty."
        )
    return tr(
        "No match: every tile of the index overlaps a positive example, and tiles that overlap a "
        "positive example are never returned, so that an example does not find itself. Draw smaller "
        "examples that leave part of the indexed imagery uncovered."
    )


def _query_label(
    positives: QgsFeatureSource, positive_count: int, negatives: Optional[QgsFeatureSource], negative_count: int
) -> str:
    label = f"{positive_count} example(s) from {positives.sourceName()}"
    if negatives is not None and negative_count:
        label += f", {negative_count} counter-example(s) from {negatives.sourceName()}"
    return label


def _is_folder(path: str) -> bool:
    """Return whether ``path`` is an existing folder; a path the system cannot check is left to later checks."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def _written_spelling(sink_id: str) -> str:
    """Return ``sink_id`` with the file name as it was written, where the writer changed its letter case.

    QGIS's writer turns a shapefile named X.SHP into X.shp, and on a case-sensitive file system
    the name given would not open.
    """
    path = Path(sink_id)
    try:
        if not path.parent.is_dir() or path.exists():
            return sink_id
        same_name = [entry for entry in path.parent.iterdir() if entry.name.lower() == path.name.lower()]
    except OSError:
        return sink_id
    return str(same_name[0]) if len(same_name) == 1 else sink_id

