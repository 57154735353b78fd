"""Processing enum values whose home moved between QGIS 3.22 and QGIS 4, looked up once.

QGIS 3.36 moved the Processing enums to ``Qgis`` (``Qgis.ProcessingSourceType`` and others). QGIS 4,
built on Qt 6, drops the unscoped names, while 3.22 has only the enums of the classes.
"""

from qgis.core import (
    QgsProcessing,
    QgsProcessingFeatureSource,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
)

from ..gis.compat import moved_enum_value

NUMBER_INTEGER = moved_enum_value("ProcessingNumberParameterType", "Integer", QgsProcessingParameterNumber.Type.Integer)
NUMBER_DOUBLE = moved_enum_value("ProcessingNumberParameterType", "Double", QgsProcessingParameterNumber.Type.Double)

SOURCE_VECTOR = moved_enum_value("ProcessingSourceType", "Vector", QgsProcessing.SourceType.TypeVector)
SOURCE_VECTOR_ANY_GEOMETRY = moved_enum_value("ProcessingSourceType", "VectorAnyGeometry",
                                              QgsProcessing.SourceType.TypeVectorAnyGeometry)
SOURCE_VECTOR_POINT = moved_enum_value("ProcessingSourceType", "VectorPoint", QgsProcessing.SourceType.TypeVectorPoint)
SOURCE_VECTOR_LINE = moved_enum_value("ProcessingSourceType", "VectorLine", QgsProcessing.SourceType.TypeVectorLine)
SOURCE_VECTOR_POLYGON = moved_enum_value("ProcessingSourceType", "VectorPolygon",
                                         QgsProcessing.SourceType.TypeVectorPolygon)
SOURCE_RASTER = moved_enum_value("ProcessingSourceType", "Raster", QgsProcessing.SourceType.TypeRaster)

FILE_FOLDER = moved_enum_value("ProcessingFileParameterBehavior", "Folder", QgsProcessingParameterFile.Behavior.Folder)
PARAMETER_ADVANCED = moved_enum_value("ProcessingParameterFlag", "Advanced",
                                      QgsProcessingParameterDefinition.Flag.FlagAdvanced)
SKIP_GEOMETRY_CHECKS = moved_enum_value("ProcessingFeatureSourceFlag", "SkipGeometryValidityChecks",
                                        QgsProcessingFeatureSource.Flag.FlagSkipGeometryValidityChecks)
