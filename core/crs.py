"""Coordinate reference systems parsed once, in the axis order every bounds tuple here uses."""

from __future__ import annotations

from osgeo import osr

from .errors import LookalikeError


def spatial_reference(crs: str, error_class: type[LookalikeError] = LookalikeError) -> osr.SpatialReference:
    """Parse ``crs`` (WKT, ``EPSG:n`` or any other GDAL user input) into a spatial reference.

    Raises:
        error_class: when GDAL cannot parse ``crs``; callers pass the error type of their layer.
    """
    reference = osr.SpatialReference()
    # x is easting or longitude whatever the CRS's official axis order, as in geotransforms.
    reference.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    try:
        status = reference.SetFromUserInput(crs)
    except RuntimeError as error:
        raise error_class(f"CRS {crs[:60]!r} is invalid ({error}); pass WKT or an EPSG code.") from error
    if status != 0:
        raise error_class(f"CRS {crs[:60]!r} is invalid; pass WKT or an EPSG code.")
    return reference
