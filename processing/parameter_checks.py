"""Messages for parameter values that QGIS's generic check would reject as "Incorrect parameter value".

``LookalikeAlgorithm.checkParameterValues`` calls ``invalid_value_message`` for every parameter
before QGIS's own check. Each message names the parameter, the value given, what is allowed and
what to change. ``qgis_process`` prints it once, under "An error was encountered while checking
parameter values", and ``processing.run`` raises it in a QgsProcessingException. The parameter
definitions keep their minimum and maximum, because those set the limits of the GUI widgets.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from qgis.core import (
    QgsMapLayer,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
    QgsProcessingUtils,
    QgsProperty,
)

from .support import tr


def invalid_value_message(
    definition: QgsProcessingParameterDefinition, value: Any, context: QgsProcessingContext, hint: str = ""
) -> Optional[str]:
    """Return why ``value`` is invalid for ``definition``, or None when it passes (or is unset).

    ``hint``, the parameter's unit and meaning, is appended to range errors of numbers.
    Unset values and data-defined properties are left to QGIS's own check, which reports a
    missing mandatory parameter.
    """
    if value is None or value == "" or isinstance(value, QgsProperty):
        return None
    if isinstance(definition, QgsProcessingParameterNumber):
        return _number_message(definition, value, context, hint)
    if isinstance(definition, QgsProcessingParameterFile):
        return _file_message(definition, value)
    if isinstance(definition, QgsProcessingParameterMultipleLayers):
        layer_hint = _layer_hint(definition.layerType())
        entries = value if isinstance(value, (list, tuple)) else [value]
        for entry in entries:
            message = _layer_message(definition.name(), entry, layer_hint, context)
            if message is not None:
                return message
        return None
    if isinstance(definition, QgsProcessingParameterRasterLayer):
        return _layer_message(definition.name(), value, QgsProcessingUtils.LayerHint.Raster, context)
    if isinstance(definition, (QgsProcessingParameterFeatureSource, QgsProcessingParameterVectorLayer)):
        return _layer_message(definition.name(), value, QgsProcessingUtils.LayerHint.Vector, context)
    return None


def _number_message(
    definition: QgsProcessingParameterNumber, value: Any, context: QgsProcessingContext, hint: str
) -> Optional[str]:
    if definition.checkValueIsAcceptable(value, context):
        return None
    name = definition.name()
    allowed = _allowed_numbers(definition)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return tr(f"{name}={value!r} is not a number; give {allowed}.")
    problem = "is invalid" if _within_bounds(definition, number) else "is out of range"
    message = tr(f"{name}={value} {problem} for '{definition.description()}'; give {allowed}.")
    return f"{message} {hint}" if hint else message


def _allowed_numbers(definition: QgsProcessingParameterNumber) -> str:
    kind = "a whole number" if definition.dataType() == QgsProcessingParameterNumber.Integer else "a number"
    has_minimum = definition.minimum() > -sys.float_info.max
    has_maximum = definition.maximum() < sys.float_info.max
    if has_minimum and has_maximum:
        return f"{kind} from {definition.minimum():g} to {definition.maximum():g}"
    if has_minimum:
        return f"{kind} of at least {definition.minimum():g}"
    if has_maximum:
        return f"{kind} of at most {definition.maximum():g}"
    return kind


def _within_bounds(definition: QgsProcessingParameterNumber, number: float) -> bool:
    return definition.minimum() <= number <= definition.maximum()


def _file_message(definition: QgsProcessingParameterFile, value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return None
    name = definition.name()
    wants_folder = definition.behavior() == QgsProcessingParameterFile.Folder
    if not os.path.exists(value):
        kind = "folder" if wants_folder else "file"
        return tr(f"{name}: the {kind} {value} does not exist; {_path_advice(value)}.")
    if wants_folder and not os.path.isdir(value):
        return tr(f"{name}: {value} is a file, but {name} takes a folder; give the folder that contains it.")
    if not wants_folder and os.path.isdir(value):
        return tr(f"{name}: {value} is a folder, but {name} takes a file; give the path of the file in it.")
    return None


def _layer_message(
    name: str, entry: Any, layer_hint: QgsProcessingUtils.LayerHint, context: QgsProcessingContext
) -> Optional[str]:
    """Check one layer given as text: a project layer's id or name, or a file path with GDAL/OGR options."""
    if isinstance(entry, QgsMapLayer) or not isinstance(entry, str):
        return None
    # Only project layers are looked up here. Loading a file through mapLayerFromString in this
    # check made the Python process crash at exit (QGIS 3.22), so a file that exists is left to
    # the algorithm, which reports a file that GDAL or OGR cannot open.
    if QgsProcessingUtils.mapLayerFromString(entry, context, False, layer_hint) is not None:
        return None
    path = entry.split("|")[0]
    if os.path.exists(path):
        return None
    return tr(f"{name}: {entry} is neither a layer of the project nor an existing file; {_path_advice(path)}.")


def _layer_hint(layer_type: int) -> QgsProcessingUtils.LayerHint:
    if layer_type == QgsProcessing.TypeRaster:
        return QgsProcessingUtils.LayerHint.Raster
    if layer_type in (
        QgsProcessing.TypeVector, QgsProcessing.TypeVectorAnyGeometry, QgsProcessing.TypeVectorPoint,
        QgsProcessing.TypeVectorLine, QgsProcessing.TypeVectorPolygon,
    ):
        return QgsProcessingUtils.LayerHint.Vector
    return QgsProcessingUtils.LayerHint.UnknownType


def _path_advice(path: str) -> str:
    if os.path.isabs(path):
        return "check the path"
    return f"check the path, which is relative to the working folder {os.getcwd()}"
