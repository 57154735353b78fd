"""The search result layer in the project: graduated by score, labelled by rank, filtered live.

QGIS does not save the features of memory layers with a project, so each result layer carries
its matches as tile ids and scores in a custom property, which the project does save. When the
index they came from is opened again, the empty layers are filled from its tile table.
"""

from __future__ import annotations

import json
from typing import Sequence

from qgis.core import QgsProject, QgsVectorLayer

from ..core.errors import LookalikeError
from ..core.index import TileIndex
from ..core.search import Match, match_for_tile
from ..gis.map_render import style_match_layer
from ..gis.matches import FIELD_SCORE, matches_to_features

RESULTS_PROPERTY = "lookalike/results"


def style_result_layer(layer: QgsVectorLayer) -> None:
    """Style a match layer (graduated by score, labelled by rank) and repaint it."""
    style_match_layer(layer)
    layer.triggerRepaint()


def apply_score_threshold(layer: QgsVectorLayer, min_score: float) -> None:
    """Show only features scoring at least ``min_score``, through the layer's subset string."""
    # repr() keeps full float precision, so the best match never falls below its own score.
    layer.setSubsetString(f'"{FIELD_SCORE}" >= {min_score!r}')
    layer.triggerRepaint()


def remember_matches(layer: QgsVectorLayer, matches: Sequence[Match], index_id: str, encoder_name: str) -> None:
    """Store the matches of ``layer`` as ranks, tile ids and scores of the index ``index_id``."""
    layer.setCustomProperty(RESULTS_PROPERTY, json.dumps({
        "index_id": index_id,
        "encoder": encoder_name,
        "matches": [[match.rank, match.tile_id, match.score] for match in matches],
    }))


def restore_result_layers(project: QgsProject, index: TileIndex) -> int:
    """Fill the empty result layers of ``project`` whose matches came from ``index``; return how many."""
    restored = 0
    for layer in project.mapLayers().values():
        if not isinstance(layer, QgsVectorLayer) or layer.providerType() != "memory":
            continue
        stored = layer.customProperty(RESULTS_PROPERTY)
        if not stored or layer.dataProvider().featureCount():
            continue
        try:
            record = json.loads(stored)
            if record["index_id"] != index.identity[1]:
                continue
            matches = [match_for_tile(index, int(rank), int(tile_id), float(score))
                       for rank, tile_id, score in record["matches"]]
        except (ValueError, TypeError, KeyError, LookalikeError):
            # Another index, or a property edited by hand: the layer stays empty.
            continue
        features = matches_to_features(matches, layer.fields(), layer.crs(),
                                       encoder_name=str(record.get("encoder", "")), query_label=layer.name())
        layer.dataProvider().addFeatures(features)
        layer.updateExtents()
        layer.triggerRepaint()
        restored += 1
    return restored
