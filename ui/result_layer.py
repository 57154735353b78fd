"""The search result layer in the project: graduated by score, labelled by rank, filtered live."""

from __future__ import annotations

from typing import Sequence

from qgis.core import (
    QgsFillSymbol,
    QgsGraduatedSymbolRenderer,
    QgsPalLayerSettings,
    QgsRendererRange,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

from ..gis.map_render import MATCH_COLOR_HIGH, MATCH_COLOR_LOW
from ..gis.matches import FIELD_RANK, FIELD_SCORE

SCORE_CLASS_COUNT = 5


def _blend(low: QColor, high: QColor, fraction: float) -> QColor:
    return QColor(
        round(low.red() + (high.red() - low.red()) * fraction),
        round(low.green() + (high.green() - low.green()) * fraction),
        round(low.blue() + (high.blue() - low.blue()) * fraction),
    )


def score_class_breaks(scores: Sequence[float], class_count: int = SCORE_CLASS_COUNT) -> list[tuple[float, float]]:
    """Split the score range into equal intervals; a single score value still gives one class."""
    if not scores:
        return [(0.0, 1.0)]
    low, high = min(scores), max(scores)
    if high - low < 1e-9:
        return [(low - 1e-6, high + 1e-6)]
    step = (high - low) / class_count
    breaks = [(low + step * index, low + step * (index + 1)) for index in range(class_count)]
    # The last upper bound is the exact maximum, so rounding never leaves the best match unclassed.
    breaks[-1] = (breaks[-1][0], high)
    return breaks


def style_result_layer(layer: QgsVectorLayer) -> None:
    """Give a match layer outlines graduated by score (weak yellow to strong red) and rank labels."""
    scores = [float(feature[FIELD_SCORE]) for feature in layer.getFeatures()]
    breaks = score_class_breaks(scores)
    low_color, high_color = QColor(MATCH_COLOR_LOW), QColor(MATCH_COLOR_HIGH)
    ranges = []
    for position, (lower, upper) in enumerate(breaks):
        fraction = position / max(len(breaks) - 1, 1)
        color = _blend(low_color, high_color, fraction)
        fill = QColor(color)
        fill.setAlpha(40)
        symbol = QgsFillSymbol.createSimple(
            {
                "color": f"{fill.red()},{fill.green()},{fill.blue()},{fill.alpha()}",
                "outline_color": color.name(),
                "outline_width": "0.6",
                "outline_width_unit": "MM",
            }
        )
        ranges.append(QgsRendererRange(lower, upper, symbol, f"{lower:.3f} – {upper:.3f}"))
    renderer = QgsGraduatedSymbolRenderer(FIELD_SCORE, ranges)
    layer.setRenderer(renderer)

    text_format = QgsTextFormat()
    text_format.setSize(10)
    text_format.setColor(QColor("white"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor("black"))
    text_format.setBuffer(buffer)
    settings = QgsPalLayerSettings()
    settings.fieldName = FIELD_RANK
    settings.setFormat(text_format)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def apply_score_threshold(layer: QgsVectorLayer, min_score: float) -> None:
    """Show only features scoring at least ``min_score``, through the layer's subset string."""
    # repr() keeps full float precision, so the best match never falls below its own score.
    layer.setSubsetString(f'"{FIELD_SCORE}" >= {min_score!r}')
    layer.triggerRepaint()
