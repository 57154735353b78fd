"""Helpers the Processing tests share: running the plugin's algorithms in process and example layers.

``tests/qgis/conftest.py`` has the ``provider``, ``tiny_encoder`` and ``ships_raster`` fixtures.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qgis.core import (
    QgsApplication,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingFeedback,
    QgsRectangle,
    QgsVectorLayer,
)

SHIPS_RASTER = Path("geo/planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif")
SHIPS_CRS = "EPSG:32610"


def use_qgis_processing_package() -> None:
    """Make ``import processing`` find QGIS's Processing plugin, not this repository's subpackage.

    ``python -m pytest`` puts the working directory, which is the plugin folder, first on
    sys.path, where ``processing`` is the plugin's own subpackage.
    """
    plugins_folder = str(Path(QgsApplication.pkgDataPath()) / "python" / "plugins")
    if plugins_folder in sys.path:
        sys.path.remove(plugins_folder)
    sys.path.insert(0, plugins_folder)
    loaded = sys.modules.get("processing")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(plugins_folder):
        for name in [name for name in sys.modules if name == "processing" or name.startswith("processing.")]:
            del sys.modules[name]


def run_algorithm(algorithm_id: str, parameters: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.run(f"lookalike:{algorithm_id}", parameters, feedback=feedback or QgsProcessingFeedback())


def point_layer(points, crs: str = SHIPS_CRS, name: str = "examples") -> QgsVectorLayer:
    layer = QgsVectorLayer(f"Point?crs={crs}", name, "memory")
    features = []
    for x, y in points:
        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    return layer


def polygon_layer(rectangles, crs: str = SHIPS_CRS, name: str = "footprints") -> QgsVectorLayer:
    layer = QgsVectorLayer(f"Polygon?crs={crs}", name, "memory")
    features = []
    for rectangle in rectangles:
        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(*rectangle)))
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    return layer
