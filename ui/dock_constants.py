"""Constants shared by the Lookalike dock and its panel mixins: extent modes, defaults, export formats."""

from __future__ import annotations

MESSAGE_TITLE = "Lookalike"

# The panel's fields for the engine's arguments, for engine messages that name an argument.
PANEL_FIELD_NAMES = {
    "band_indexes": "the Bands row",
    "tile_size_source_px": "the tile size, which the GSD sets",
    "tile_ground_size_m": "the tile size, which the GSD sets",
    "overlap_fraction": "the Overlap field (percent)",
    "index_folder": "the Index folder field",
    "encoder_path": "the Encoder field",
    "add_to_existing": "the box to add the raster to the existing index",
    "max_tile_count": "a limit of the engine that the panel keeps; choose a coarser GSD or a smaller extent",
}

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
