"""Map tools that draw a similarity query on the canvas, and the rubber bands that show the query.

Each tool emits ``queryDrawn(geometry, is_negative)`` with the geometry in the canvas CRS. A
query part is negative when the tool's negative mode is on or Shift is held while drawing, so an
analyst can switch between "more like this" and "not like this" without leaving the tool. A
drawing that cannot be a query emits ``queryRejected(message)`` with a sentence for the user.
"""

from __future__ import annotations

from typing import List, Optional

from qgis.core import QgsGeometry, QgsPointXY, QgsRectangle
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import QPoint, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent

from .compat import POINT_GEOMETRY, POLYGON_GEOMETRY

POSITIVE_COLOR = QColor(0, 170, 80)
NEGATIVE_COLOR = QColor(215, 40, 40)
PREVIEW_COLOR = QColor(255, 160, 0)

# A press and release closer than this many screen pixels is a click, not a drag.
MIN_DRAG_PX = 3

POLYGON_WITHOUT_AREA = (
    "The polygon has no area, so it was not added to the query. Click at least three points that "
    "are not on one line, then right-click or double-click to close the polygon."
)


def _make_band(canvas: QgsMapCanvas, color: QColor, geometry_type=POLYGON_GEOMETRY) -> QgsRubberBand:
    band = QgsRubberBand(canvas, geometry_type)
    band.setStrokeColor(color)
    fill = QColor(color)
    fill.setAlpha(50)
    band.setFillColor(fill)
    band.setWidth(2)
    return band


class QueryMapTool(QgsMapTool):
    """Base of the query tools: negative mode, the preview rubber band and Escape to cancel."""

    queryDrawn = pyqtSignal(QgsGeometry, bool)  # noqa: N815 - Qt signal naming
    queryRejected = pyqtSignal(str)  # noqa: N815 - Qt signal naming

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.negative_mode = False
        self._preview: Optional[QgsRubberBand] = None
        self.setCursor(Qt.CursorShape.CrossCursor)

    def set_negative_mode(self, negative: bool) -> None:
        self.negative_mode = negative
        if self._preview is not None:
            self._preview.setStrokeColor(self._preview_color(negative))

    def is_negative(self, event: QgsMapMouseEvent) -> bool:
        shift_held = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        return self.negative_mode or shift_held

    def _preview_color(self, negative: bool) -> QColor:
        return NEGATIVE_COLOR if negative else PREVIEW_COLOR

    def _preview_band(self, negative: bool) -> QgsRubberBand:
        if self._preview is None:
            self._preview = _make_band(self.canvas(), self._preview_color(negative))
        self._preview.setStrokeColor(self._preview_color(negative))
        return self._preview

    def reset_preview(self) -> None:
        if self._preview is not None:
            self.canvas().scene().removeItem(self._preview)
            self._preview = None

    def cancel_drawing(self) -> None:
        """Drop the part being drawn and its preview, so the next click starts a new part."""
        self.reset_preview()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() == Qt.Key.Key_Escape:
            self.cancel_drawing()
            event.accept()
            return
        event.ignore()

    def deactivate(self) -> None:
        self.cancel_drawing()
        super().deactivate()


class RectangleQueryTool(QueryMapTool):
    """Drag a rectangle around the object to look for."""

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self._start_map: Optional[QgsPointXY] = None
        self._start_pixel: Optional[QPoint] = None

    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() != Qt.MouseButton.LeftButton:
            return
        self._start_map = event.mapPoint()
        self._start_pixel = event.pixelPoint()

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._start_map is None:
            return
        rectangle = QgsRectangle(self._start_map, event.mapPoint())
        self._preview_band(self.is_negative(event)).setToGeometry(QgsGeometry.fromRect(rectangle), None)

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() != Qt.MouseButton.LeftButton or self._start_map is None:
            return
        start_map, start_pixel = self._start_map, self._start_pixel
        self._start_map = None
        self._start_pixel = None
        self.reset_preview()
        drag = event.pixelPoint() - start_pixel
        if abs(drag.x()) < MIN_DRAG_PX or abs(drag.y()) < MIN_DRAG_PX:
            return
        rectangle = QgsRectangle(start_map, event.mapPoint())
        self.queryDrawn.emit(QgsGeometry.fromRect(rectangle), self.is_negative(event))

    def cancel_drawing(self) -> None:
        self._start_map = None
        self._start_pixel = None
        super().cancel_drawing()


class PolygonQueryTool(QueryMapTool):
    """Click the vertices of a polygon; right-click or double-click closes it, Backspace undoes one."""

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self._vertices: List[QgsPointXY] = []
        self._negative = False
        self._skip_release = False

    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        # A press starts a new click. Clearing the flag here keeps a double click whose last
        # release never arrived from swallowing the next vertex.
        self._skip_release = False

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._skip_release:
            self._skip_release = False
            return
        if event.button() == Qt.MouseButton.RightButton:
            self._finish()
            return
        if event.button() != Qt.MouseButton.LeftButton:
            return
        if not self._vertices:
            self._negative = self.is_negative(event)
        self._vertices.append(event.mapPoint())
        self._update_preview(None)

    def canvasDoubleClickEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() != Qt.MouseButton.LeftButton:
            return
        # Qt delivers a double click as press, release, double-click, release. The first release
        # already added this vertex, and the second one must not start the next polygon.
        self._skip_release = True
        self._finish()

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._vertices:
            self._update_preview(event.mapPoint())

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() == Qt.Key.Key_Backspace and self._vertices:
            self._vertices.pop()
            self._update_preview(None)
            event.accept()
            return
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self._finish()
            event.accept()
            return
        super().keyPressEvent(event)

    def cancel_drawing(self) -> None:
        self._vertices = []
        self._negative = False
        self._skip_release = False
        super().cancel_drawing()

    def _update_preview(self, cursor: Optional[QgsPointXY]) -> None:
        points = list(self._vertices) + ([cursor] if cursor is not None else [])
        if len(points) < 2:
            # Backspace can leave a single vertex, whose old preview must go.
            self.reset_preview()
            return
        band = self._preview_band(self._negative)
        band.setToGeometry(QgsGeometry.fromPolygonXY([points]), None)

    def _finish(self) -> None:
        vertices = _without_repeated_points(self._vertices)
        negative = self._negative
        self._vertices = []
        self._negative = False
        self.reset_preview()
        if not vertices:
            # A right-click or Enter with nothing drawn is not an attempt at a polygon.
            return
        polygon = QgsGeometry.fromPolygonXY([vertices]) if len(vertices) >= 3 else None
        # The area of a ring whose edges cross is signed per lobe, so the two equal lobes of a
        # figure-eight sum to 0. The repaired polygon has the area that was drawn.
        if polygon is None or polygon.makeValid().area() <= 0:
            self.queryRejected.emit(POLYGON_WITHOUT_AREA)
            return
        self.queryDrawn.emit(polygon, negative)


def _without_repeated_points(vertices: List[QgsPointXY]) -> List[QgsPointXY]:
    """Drop each vertex equal to the one before it, and a last vertex equal to the first.

    Clicking the same spot twice, or on the first vertex to close the ring, must not make a
    polygon with a zero-length edge.
    """
    distinct: List[QgsPointXY] = []
    for vertex in vertices:
        if not distinct or vertex != distinct[-1]:
            distinct.append(vertex)
    if len(distinct) > 1 and distinct[-1] == distinct[0]:
        distinct.pop()
    return distinct


class PointQueryTool(QueryMapTool):
    """Click a point; the dock queries with one tile centred on it."""

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() != Qt.MouseButton.LeftButton:
            return
        self.queryDrawn.emit(QgsGeometry.fromPointXY(event.mapPoint()), self.is_negative(event))


class QueryOverlay:
    """Rubber bands that keep the current query parts on the canvas, coloured by polarity."""

    def __init__(self, canvas: QgsMapCanvas) -> None:
        self.canvas = canvas
        self._bands: List[QgsRubberBand] = []

    def add(self, geometry: QgsGeometry, negative: bool) -> None:
        color = NEGATIVE_COLOR if negative else POSITIVE_COLOR
        geometry_type = POINT_GEOMETRY if geometry.type() == POINT_GEOMETRY else POLYGON_GEOMETRY
        band = _make_band(self.canvas, color, geometry_type)
        band.setToGeometry(geometry, None)
        self._bands.append(band)

    def clear(self) -> None:
        for band in self._bands:
            self.canvas.scene().removeItem(band)
        self._bands = []

    def __len__(self) -> int:
        return len(self._bands)
