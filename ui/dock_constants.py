"""Constants shared by the Lookalike dock and its panel mixins: extent modes, defaults, export formats."""

from __future__ import annotations

MESSAGE_TITLE = "Lookalike"

EXTENT_WHOLE_LAYER = "whole_layer"
EXTENT_MAP_VIEW = "map_view"
EXTENT_POLYGONS = "polygons"
EXTENT_SELECTED = "selected_polygons"
EXTENT_LABELS = {
    EXTENT_WHOLE_LAYER: "Whole layer",
    EXTENT_MAP_VIEW: "Current map view",
    EXTENT_POLYGONS: "Polygons of a layer",
    EXTENT_SELECTED: "Selected polygons only",
}
OTHER_ENCODER = "other"

DEFAULT_K = 20
DEFAULT_OVERLAP_PERCENT = 50
# The slider maps its integer steps onto the score range of the current results.
THRESHOLD_STEPS = 1000
# Metres per degree of latitude, for a default GSD on rasters in geographic CRSs.
METRES_PER_DEGREE = 111320.0

EXPORT_FORMATS = {
    "GeoPackage": ("GPKG", "gpkg"),
    "GeoJSON": ("GeoJSON", "geojson"),
    "CSV": ("CSV", "csv"),
    "ESRI Shapefile": ("ESRI Shapefile", "shp"),
}
CHIP_FORMATS = {"GeoTIFF": "GTiff", "PNG": "PNG"}
