"""QGIS and Qt enum values that differ between QGIS 3.22 (Qt 5) and QGIS 4 (Qt 6), looked up once."""

from typing import Any

from qgis.core import Qgis, QgsRasterInterface
from qgis.PyQt.QtCore import QMetaType, QVariant


def moved_enum_value(enum_name: str, member_name: str, old_value: Any) -> Any:
    """Return ``Qgis.<enum_name>.<member_name>`` where this QGIS has it, else ``old_value``."""
    enum = getattr(Qgis, enum_name, None)
    return getattr(enum, member_name, old_value) if enum is not None else old_value


# Under Qt 6 QVariant has no type enum, so QgsField needs QMetaType types there. Earlier releases
# take QVariant types. NOTE: only the QVariant branch runs here (QGIS 3.22); the 3.38 boundary,
# where QGIS moved its field types to QMetaType, is untested.
if Qgis.QGIS_VERSION_INT >= 33800:
    FIELD_INT, FIELD_LONG, FIELD_DOUBLE, FIELD_STRING = (
        QMetaType.Type.Int, QMetaType.Type.LongLong, QMetaType.Type.Double, QMetaType.Type.QString)
else:
    FIELD_INT, FIELD_LONG, FIELD_DOUBLE, FIELD_STRING = (
        QVariant.Int, QVariant.LongLong, QVariant.Double, QVariant.String)

# QGIS 3.38 moved the raster interface capabilities to Qgis.RasterInterfaceCapability.
RASTER_SIZE_CAPABILITY = moved_enum_value("RasterInterfaceCapability", "Size", QgsRasterInterface.Capability.Size)
