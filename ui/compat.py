"""Enum values whose home moved between QGIS 3.22 and QGIS 4, looked up once.

QGIS 3.30 moved the geometry-type enum to ``Qgis.GeometryType`` and 3.34 moved the layer filter
to ``Qgis.LayerFilter``. QGIS 4 drops the old aliases, while 3.22 has only the old ones.
"""

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsWkbTypes

if hasattr(Qgis, "GeometryType"):
    POLYGON_GEOMETRY = Qgis.GeometryType.Polygon
    POINT_GEOMETRY = Qgis.GeometryType.Point
else:
    POLYGON_GEOMETRY = QgsWkbTypes.GeometryType.PolygonGeometry
    POINT_GEOMETRY = QgsWkbTypes.GeometryType.PointGeometry

if hasattr(Qgis, "LayerFilter"):
    RASTER_LAYER_FILTER = Qgis.LayerFilter.RasterLayer
    POLYGON_LAYER_FILTER = Qgis.LayerFilter.PolygonLayer
    VECTOR_LAYER_FILTER = Qgis.LayerFilter.VectorLayer
else:
    RASTER_LAYER_FILTER = QgsMapLayerProxyModel.Filter.RasterLayer
    POLYGON_LAYER_FILTER = QgsMapLayerProxyModel.Filter.PolygonLayer
    VECTOR_LAYER_FILTER = QgsMapLayerProxyModel.Filter.VectorLayer
