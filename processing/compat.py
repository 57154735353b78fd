"""Processing enum values whose home moved between QGIS 3.22 and QGIS 4, looked up once.

QGIS 3.36 moved the Processing enums to ``Qgis`` (``Qgis.ProcessingSourceType`` and others). QGIS 4,
built on Qt 6, drops the unscoped names, while 3.22 has only the enums of the classes.
"""

from typing import Any

from qgis.core import (
    Qgis,
    QgsProcessing,
    QgsProcessingFeatureSource,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
)


def _moved(enum_name: str, member_name: str, old_value: Any) -> Any:
    """Return ``Qgis.<enum_name>.<member_name>`` where this QGIS has it, else ``old_value``."""
    enum = getattr(Qgis, enum_name, None)
    return getattr(enum, member_name, old_value) if enum is not None else old_value


NUMBER_INTEGER = _moved("ProcessingNumberParameterType", "Integer", QgsProcessingParameterNumber.Type.Integer)
NUMBER_DOUBLE = _moved("ProcessingNumberParameterType", "Double", QgsProcessingParameterNumber.Type.Double)

SOURCE_VECTOR = _moved("ProcessingSourceType", "Vector", QgsProcessing.SourceType.TypeVector)
SOURCE_VECTOR_ANY_GEOMETRY = _moved("ProcessingSourceType", "VectorAnyGeometry",
                                    QgsProcessing.SourceType.TypeVectorAnyGeometry)
SOURCE_VECTOR_POINT = _moved("ProcessingSourceType", "VectorPoint", QgsProcessing.SourceType.TypeVectorPoint)
SOURCE_VECTOR_LINE = _moved("ProcessingSourceType", "VectorLine", QgsProcessing.SourceType.TypeVectorLine)
SOURCE_VECTOR_POLYGON = _moved("ProcessingSourceType", "VectorPolygon", QgsProcessing.SourceType.TypeVectorPolygon)
SOURCE_RASTER = _moved("ProcessingSourceType", "Raster", QgsProcessing.SourceType.TypeRaster)

FILE_FOLDER = _moved("ProcessingFileParameterBehavior", "Folder", QgsProcessingParameterFile.Behavior.Folder)
PARAMETER_ADVANCED = _moved("ProcessingParameterFlag", "Advanced", QgsProcessingParameterDefinition.Flag.FlagAdvanced)
SKIP_GEOMETRY_CHECKS = _moved("ProcessingFeatureSourceFlag", "SkipGeometryValidityChecks",
                              QgsProcessingFeatureSource.Flag.FlagSkipGeometryValidityChecks)
