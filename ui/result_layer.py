"""The search result layer in the project: graduated by score, labelled by rank, filtered live."""

from __future__ import annotations

from qgis.core import QgsVectorLayer

from ..gis.map_render import style_match_layer
from ..gis.matches import FIELD_SCORE


def style_result_layer(layer: QgsVectorLayer) -> None:
    """Style a match layer (graduated by score, labelled by rank) and repaint it."""
    style_match_layer(layer)
    layer.triggerRepaint()


def apply_score_threshold(layer: QgsVectorLayer, min_score: float) -> None:
    """Show only features scoring at least ``min_score``, through the layer's subset string."""
    # repr() keeps full float precision, so the best match never falls below its own score.
    layer.setSubsetString(f'"{FIELD_SCORE}" >= {min_score!r}')
    layer.triggerRepaint()
