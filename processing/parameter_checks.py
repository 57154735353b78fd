"""Messages for parameter values that QGIS's generic check would reject as "Incorrect parameter value".

``LookalikeAlgorithm.checkParameterValues`` calls ``invalid_value_message`` for every parameter
before QGIS's own check. Each message names the parameter, the value given, what is allowed and
what to change. ``qgis_process`` prints it once, under "An error was encountered while checking
parameter values", and ``processing.run`` raises it in a QgsProcessingException. The parameter
definitions keep their minimum and maximum, because those set the limits of the GUI widgets.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional

from qgis.core import (
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
    QgsProcessingUtils,
    QgsProperty,
)

from ..core.checkpoints import PARTIAL_SUFFIX
from ..core.raster import open_raster_quietly
from .compat import (
    FILE_FOLDER,
    NUMBER_INTEGER,
    SOURCE_RASTER,
    SOURCE_VECTOR,
    SOURCE_VECTOR_ANY_GEOMETRY,
    SOURCE_VECTOR_LINE,
    SOURCE_VECTOR_POINT,
    SOURCE_VECTOR_POLYGON,
)
from .support import tr


def invalid_value_message(
    definition: QgsProcessingParameterDefinition,
    value: Any,
    context: QgsProcessingContext,
    hint: str = "",
    positive: bool = False,
) -> Optional[str]:
    """Return why ``value`` is invalid for ``definition``, or None when it passes (or is unset).

    ``hint``, the parameter's unit and meaning, is appended to range errors of numbers.
    ``positive`` rejects a number equal to the definition's minimum of 0 as well. Unset values
    and data-defined properties are left to QGIS's own check, which reports a missing mandatory
    parameter.
    """
    if value is None or value == "" or isinstance(value, QgsProperty):
        return None
    if isinstance(definition, QgsProcessingParameterNumber):
        return _number_message(definition, value, context, hint, positive)
    if isinstance(definition, QgsProcessingParameterEnum):
        return _enum_message(definition, value, context)
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
    definition: QgsProcessingParameterNumber, value: Any, context: QgsProcessingContext, hint: str, positive: bool
) -> Optional[str]:
    name = definition.name()
    acceptable = definition.checkValueIsAcceptable(value, context)
    try:
        number = float(value)
    except (TypeError, ValueError):
        # QGIS accepts any text for an optional number and then reads it as 0 ("50%", or "0,8"
        # with a decimal comma), so text that is no number is rejected here even when QGIS accepts it.
        if acceptable and not isinstance(value, str):
            return None
        return tr(f"{name}={value!r} is not a number; give {_allowed_numbers(definition, positive)}.")
    if math.isnan(number):
        # NaN compares false with both bounds, so QGIS's range check lets it through.
        return tr(f"{name}={value} is not a number; give {_allowed_numbers(definition, positive)}.")
    whole = definition.dataType() != NUMBER_INTEGER or number.is_integer()
    below = _below_minimum(definition, number, positive)
    above = number > definition.maximum()
    if acceptable and whole and not below and not above:
        return None
    # QGIS accepts a fraction for an integer parameter and rounds it when the algorithm reads it.
    if not whole and math.isfinite(number):
        problem = "is invalid"
        reason = " because it is not a whole number"
    elif below or above:
        problem = "is out of range"
        reason = ""
    else:
        problem = "is invalid"
        reason = ""
    # A value below the minimum gets the minimum alone, the bound it has to move past.
    allowed = _allowed_numbers(definition, positive, minimum_only=below)
    message = tr(f"{name}={value} {problem} for '{definition.description()}'{reason}; give {allowed}.")
    return f"{message} {hint}" if hint else message


def _enum_message(definition: QgsProcessingParameterEnum, value: Any, context: QgsProcessingContext) -> Optional[str]:
    if definition.checkValueIsAcceptable(value, context):
        return None
    if definition.usesStaticStrings():
        choices = ", ".join(repr(option) for option in definition.options())
    else:
        choices = ", ".join(f"{position} ({option})" for position, option in enumerate(definition.options()))
    return tr(f"{definition.name()}={value} is invalid for '{definition.description()}'; give one of {choices}.")


def _allowed_numbers(definition: QgsProcessingParameterNumber, positive: bool, minimum_only: bool = False) -> str:
    kind = "a whole number" if definition.dataType() == NUMBER_INTEGER else "a number"
    has_minimum = definition.minimum() > -sys.float_info.max
    has_maximum = definition.maximum() < sys.float_info.max
    if has_minimum and (minimum_only or not has_maximum):
        if positive:
            return f"{kind} greater than {definition.minimum():g}"
        return f"{kind} of at least {definition.minimum():g}"
    if has_minimum and has_maximum:
        if positive:
            return f"{kind} greater than {definition.minimum():g} and at most {definition.maximum():g}"
        return f"{kind} from {definition.minimum():g} to {definition.maximum():g}"
    if has_maximum:
        return f"{kind} of at most {definition.maximum():g}"
    return kind


def _below_minimum(definition: QgsProcessingParameterNumber, number: float, positive: bool) -> bool:
    return number <= definition.minimum() if positive else number < definition.minimum()


def _file_message(definition: QgsProcessingParameterFile, value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return None
    name = definition.name()
    wants_folder = definition.behavior() == FILE_FOLDER
    if not os.path.exists(value):
        kind = "folder" if wants_folder else "file"
        checkpoints = f"{value.rstrip('/' + os.sep)}{PARTIAL_SUFFIX}"
        if wants_folder and os.path.isdir(checkpoints):
            return tr(f"{name}: the folder {value} does not exist yet: a build into it is running or was "
                      f"interrupted (its finished tiles are in {checkpoints}); wait for it to finish, or run it again "
                      "to resume it.")
        return tr(f"{name}: the {kind} {value} does not exist; {_path_advice(value)}.")
    if wants_folder and not os.path.isdir(value):
        return tr(f"{name}: {value} is a file, but {name} takes a folder; choose the folder itself (for an index, "
                  "the folder that contains manifest.json).")
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
    # check made the Python process crash at exit (QGIS 3.22), so an existing raster file is
    # opened with GDAL directly, and an existing vector file is left to the algorithm.
    if QgsProcessingUtils.mapLayerFromString(entry, context, False, layer_hint) is not None:
        return None
    path = entry.split("|")[0]
    if not os.path.exists(path):
        return tr(f"{name}: {entry} is neither a layer of the project nor an existing file; {_path_advice(path)}.")
    # QGIS's own check would try every data provider on the path (GDAL, then mesh), print each
    # failure to stderr and end with "Could not load source layer" or "Incorrect parameter value".
    if layer_hint == QgsProcessingUtils.LayerHint.Raster and not _gdal_opens_raster(path):
        kind = "a folder" if os.path.isdir(path) else "a file"
        return tr(
            f"{name}: {path} is {kind} but not a raster GDAL can read; give a raster file such as a "
            "GeoTIFF or VRT, or a raster layer of the project."
        )
    return None


def _gdal_opens_raster(path: str) -> bool:
    # Quiet, because the caller reports the failure in one message.
    return open_raster_quietly(path) is not None


def _layer_hint(layer_type: int) -> QgsProcessingUtils.LayerHint:
    if layer_type == SOURCE_RASTER:
        return QgsProcessingUtils.LayerHint.Raster
    if layer_type in (
        SOURCE_VECTOR, SOURCE_VECTOR_ANY_GEOMETRY, SOURCE_VECTOR_POINT,
        SOURCE_VECTOR_LINE, SOURCE_VECTOR_POLYGON,
    ):
        return QgsProcessingUtils.LayerHint.Vector
    return QgsProcessingUtils.LayerHint.UnknownType


def _path_advice(path: str) -> str:
    if os.path.isabs(path):
        return "check the path"
    return f"check the path, which is relative to the working folder {os.getcwd()}"
