"""Render a PNG map of a search: the raster, the query outline and the ranked matches.

Rendering goes through ``QgsMapSettings`` and ``QgsMapRendererParallelJob``, so it works without
a map canvas (headless tools, Processing, tests under ``QT_QPA_PLATFORM=offscreen``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFillSymbol,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsMapLayer,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsPalLayerSettings,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsRendererRange,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QFont

from ..core import get_logger
from ..core.errors import LookalikeError
from .matches import FIELD_RANK, FIELD_SCORE

LOGGER = get_logger("gis.map_render")

QUERY_OUTLINE_COLOR = "#00e5ff"
# Match outlines run from MATCH_COLOR_LOW (lowest score shown) to MATCH_COLOR_HIGH (best).
MATCH_COLOR_LOW = "#ffd400"
MATCH_COLOR_HIGH = "#ff1744"
SCORE_CLASS_COUNT = 5
DEFAULT_MAP_SIZE_PX = (1400, 700)

Bounds = tuple[float, float, float, float]


def query_outline_layer(
    query_bounds: Sequence[Bounds],
    crs: QgsCoordinateReferenceSystem,
    name: str = "Lookalike query",
) -> QgsVectorLayer:
    """Create a memory layer with one rectangle per query region, styled as a thick outline.

    ``query_bounds`` are ``(xmin, ymin, xmax, ymax)`` tuples in ``crs``.
    """
    layer = QgsVectorLayer("Polygon", name, "memory")
    layer.setCrs(crs)
    features = []
    for bounds in query_bounds:
        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(*bounds)))
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    layer.updateExtents()

    symbol = QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": QUERY_OUTLINE_COLOR, "outline_width": "0.9",
         "outline_width_unit": "MM", "outline_style": "dash"}
    )
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    return layer


def rank_labeling() -> QgsVectorLayerSimpleLabeling:
    """Return labels that write each match's rank in white with a black buffer."""
    text_format = QgsTextFormat()
    font = QFont()
    font.setBold(True)
    text_format.setFont(font)
    text_format.setSize(10)
    text_format.setColor(QColor("white"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor("black"))
    text_format.setBuffer(buffer)

    label_settings = QgsPalLayerSettings()
    label_settings.fieldName = FIELD_RANK
    label_settings.setFormat(text_format)
    # Overlapping tiles would otherwise hide each other's labels in the collision check.
    label_settings.displayAll = True
    return QgsVectorLayerSimpleLabeling(label_settings)


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


def style_match_layer(layer: QgsVectorLayer) -> None:
    """Style a match layer as outlines coloured by score, each labelled with its rank.

    The colour scale spans the scores present in the layer, so the best match is always
    MATCH_COLOR_HIGH and the weakest MATCH_COLOR_LOW, whatever the encoder's score range.
    """
    score_index = layer.fields().indexOf(FIELD_SCORE)
    if score_index < 0 or layer.fields().indexOf(FIELD_RANK) < 0:
        raise LookalikeError(
            f"The layer {layer.name()!r} has no '{FIELD_SCORE}' or '{FIELD_RANK}' field; style a "
            "layer made by gis.matches.matches_to_memory_layer."
        )
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

    layer.setLabeling(rank_labeling())
    layer.setLabelsEnabled(True)


def render_map_png(
    raster_layer: QgsRasterLayer,
    output_path: Union[str, Path],
    *,
    match_layer: Optional[QgsVectorLayer] = None,
    query_layer: Optional[QgsVectorLayer] = None,
    extent: Optional[QgsRectangle] = None,
    size_px: tuple[int, int] = DEFAULT_MAP_SIZE_PX,
    overwrite: bool = False,
) -> Path:
    """Render the raster with the query outline and the matches on top to a PNG file.

    The map is drawn in the raster's CRS over ``extent`` (in that CRS; default: the raster's
    full extent), at ``size_px`` (width, height) pixels. ``match_layer`` is styled with
    :func:`style_match_layer` when it has the match fields; ``query_layer`` is drawn as is.

    Raises:
        LookalikeError: the output exists and ``overwrite`` is false, a layer is invalid, or
            rendering or saving fails.
    """
    output_path = Path(output_path)
    if output_path.exists() and not overwrite:
        raise LookalikeError(
            f"The map image {output_path} already exists; choose another path or pass "
            "overwrite=True to replace it."
        )
    if not raster_layer.isValid():
        raise LookalikeError(
            f"The raster layer {raster_layer.name()!r} ({raster_layer.source()}) is invalid; "
            "check that the file exists and GDAL can open it."
        )

    layers: list[QgsMapLayer] = []
    if query_layer is not None:
        layers.append(query_layer)
    if match_layer is not None:
        style_match_layer(match_layer)
        layers.append(match_layer)
    layers.append(raster_layer)

    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(raster_layer.crs())
    settings.setTransformContext(QgsProject.instance().transformContext())
    settings.setOutputSize(QSize(*size_px))
    settings.setBackgroundColor(QColor("white"))
    settings.setExtent(extent if extent is not None else raster_layer.extent())
    settings.setFlag(Qgis.MapSettingsFlag.Antialiasing, True)
    settings.setFlag(Qgis.MapSettingsFlag.DrawLabeling, True)

    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    for error in job.errors():
        LOGGER.warning("Rendering layer %s reported: %s", error.layerID, error.message)
    image = job.renderedImage()
    if image.isNull():
        raise LookalikeError(
            f"Rendering the map for {output_path} produced no image; check the QGIS message log "
            "for layer errors."
        )
    if not image.save(str(output_path), "PNG"):
        raise LookalikeError(
            f"Saving the map image to {output_path} failed; check that the folder exists and "
            "is writable."
        )
    LOGGER.info("Rendered the match map to %s", output_path)
    return output_path

