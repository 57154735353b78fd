"""The search result layer in the project: graduated by score, labelled by rank, filtered live.

QGIS does not save the features of memory layers with a project, so each result layer carries
its matches as tile ids and scores in a custom property, which the project does save. When the
index they came from is opened again, the empty layers are filled from its tile table.
"""

from __future__ import annotations

import json
import math
from typing import Callable, NamedTuple, Optional, Sequence

from qgis.core import QgsFeatureRequest, QgsProject, QgsVectorLayer

from ..core import get_logger
from ..core.errors import LookalikeError
from ..core.index import TileIndex
from ..core.search import Match, matches_for_tiles
from ..gis.map_render import style_match_layer
from ..gis.matches import FIELD_SCORE, FIELD_TILE_ID, matches_to_features

LOGGER = get_logger("ui.result_layer")

RESULTS_PROPERTY = "lookalike/results"
MIN_SCORE_PROPERTY = "lookalike/min_score"


def style_result_layer(layer: QgsVectorLayer) -> None:
    """Style a match layer (graduated by score, labelled by rank) and repaint it."""
    style_match_layer(layer)
    layer.triggerRepaint()


def apply_score_threshold(layer: QgsVectorLayer, min_score: float) -> None:
    """Show only features scoring at least ``min_score``, through the layer's subset string."""
    # repr() keeps full float precision, so the best match never falls below its own score.
    layer.setSubsetString(f'"{FIELD_SCORE}" >= {min_score!r}')
    # The project does not bring a memory layer's subset string back, so the threshold is kept too.
    layer.setCustomProperty(MIN_SCORE_PROPERTY, repr(float(min_score)))
    layer.triggerRepaint()


class RestoredLayers(NamedTuple):
    """The outcome of :func:`restore_result_layers`: the layers filled, and the names of layers left empty.

    ``other_index_names`` maps the folder of each other index to the names of its empty layers.
    """

    filled: list[QgsVectorLayer]
    earlier_build_names: list[str]
    other_index_names: dict[str, list[str]]


def tile_ids_by_feature_id(layer: QgsVectorLayer) -> dict[int, int]:
    """Return the tile id of each feature of a match layer, by feature id.

    Call it before a score threshold is applied: the memory provider leaves out the features
    the subset string hides.
    """
    request = QgsFeatureRequest().setFlags(QgsFeatureRequest.Flag.NoGeometry).setSubsetOfAttributes(
        [FIELD_TILE_ID], layer.fields())
    return {feature.id(): int(feature[FIELD_TILE_ID]) for feature in layer.dataProvider().getFeatures(request)}


def forget_matches(layer: QgsVectorLayer, tile_ids: set[int]) -> None:
    """Leave the matches of ``tile_ids`` out of the matches stored with ``layer``.

    Features the analyst deleted from a result layer then stay deleted when the project is
    opened again and the layer is filled from the index.
    """
    stored = layer.customProperty(RESULTS_PROPERTY)
    if not stored:
        return
    try:
        record = json.loads(stored)
        record["matches"] = [entry for entry in record["matches"] if entry[1] not in tile_ids]
    except (ValueError, TypeError, KeyError, IndexError) as error:
        LOGGER.warning("The matches saved with the result layer %s cannot be updated: %s", layer.name(), error)
        return
    layer.setCustomProperty(RESULTS_PROPERTY, json.dumps(record))


def remember_matches(
    layer: QgsVectorLayer, matches: Sequence[Match], index_identity: tuple[str, str], encoder_name: str
) -> None:
    """Store the matches of ``layer`` as ranks, tile ids and scores of the index ``(folder, id)``."""
    index_folder, index_id = index_identity
    layer.setCustomProperty(RESULTS_PROPERTY, json.dumps({
        "index_id": index_id,
        "index_folder": index_folder,
        "encoder": encoder_name,
        "query": layer.name(),
        "matches": [[match.rank, match.tile_id, match.score] for match in matches],
    }))


def restore_result_layers(
    project: QgsProject, index: TileIndex, watch: Callable[[QgsVectorLayer], None]
) -> RestoredLayers:
    """Fill the empty result layers of ``project`` whose matches came from ``index``.

    ``watch`` is called with each layer once it is filled and before its score threshold applies.

    Layers whose matches came from an earlier build in the same folder stay empty, because their
    tile ids may now name other tiles. The result lists their names.
    """
    index_folder, index_id = index.identity
    restored = []
    earlier_build_names = []
    other_index_names: dict[str, list[str]] = {}
    for layer in project.mapLayers().values():
        if not isinstance(layer, QgsVectorLayer) or layer.providerType() != "memory":
            continue
        stored = layer.customProperty(RESULTS_PROPERTY)
        if not stored or layer.dataProvider().featureCount():
            continue
        try:
            record = json.loads(stored)
            if record["index_id"] != index_id:
                if record.get("index_folder") == index_folder:
                    earlier_build_names.append(layer.name())
                elif record.get("index_folder"):
                    other_index_names.setdefault(str(record["index_folder"]), []).append(layer.name())
                continue
            matches = _matches_of_record(record, index)
            features = matches_to_features(
                matches, layer.fields(), layer.crs(), encoder_name=str(record.get("encoder", "")),
                query_label=str(record.get("query") or layer.name()),
            )
        except (ValueError, TypeError, KeyError, IndexError, LookalikeError) as error:
            # Another index, or a property edited by hand: this layer stays empty, the others are filled.
            LOGGER.warning("The result layer %s cannot be filled from its saved matches: %s", layer.name(), error)
            continue
        layer.dataProvider().addFeatures(features)
        layer.updateExtents()
        watch(layer)
        min_score = stored_min_score(layer)
        if min_score is not None:
            apply_score_threshold(layer, min_score)
        layer.triggerRepaint()
        restored.append(layer)
    return RestoredLayers(restored, sorted(earlier_build_names),
                          {folder: sorted(names) for folder, names in sorted(other_index_names.items())})


def stored_matches(layer: QgsVectorLayer, index: TileIndex) -> Optional[list[Match]]:
    """Return the matches saved with ``layer``, or None when they did not come from this build of ``index``."""
    stored = layer.customProperty(RESULTS_PROPERTY)
    if not stored:
        return None
    try:
        record = json.loads(stored)
        if record["index_id"] != index.identity[1]:
            return None
        return _matches_of_record(record, index)
    except (ValueError, TypeError, KeyError, IndexError, LookalikeError) as error:
        LOGGER.warning("The matches saved with the result layer %s cannot be read: %s", layer.name(), error)
        return None


def _matches_of_record(record: dict, index: TileIndex) -> list[Match]:
    return matches_for_tiles(index, [_stored_match(entry, index.count) for entry in record["matches"]])


def stored_min_score(layer: QgsVectorLayer) -> Optional[float]:
    """Return the score threshold saved with a result layer, or None."""
    try:
        min_score = float(layer.customProperty(MIN_SCORE_PROPERTY))
    except (TypeError, ValueError):
        return None
    return min_score if math.isfinite(min_score) else None


def _stored_match(entry: Sequence, tile_count: int) -> tuple[int, int, float]:
    """Return ``(rank, tile_id, score)`` of a saved match; raise ValueError for an entry a search cannot have made."""
    rank, tile_id, score = entry
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in (rank, tile_id)):
        raise ValueError(f"rank {rank!r} and tile id {tile_id!r} must be whole numbers")
    if not 0 <= tile_id < tile_count:
        raise ValueError(f"tile id {tile_id} is not in the index of {tile_count} tiles")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        raise ValueError(f"score {score!r} is not a finite number")
    return rank, tile_id, float(score)
