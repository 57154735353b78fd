"""Coordinate reference systems: the one parser, and how ground metres map to CRS units.

Every ``_m`` value of the engine (GSD, tile ground size) is metres on the ground, while a grid
CRS stores lengths in its own units. :func:`grid_scale` converts between them: one ground metre
spans ``scale_factor / metres_per_unit`` CRS units. ``metres_per_unit`` is the CRS's linear unit
(OSR ``GetLinearUnits``). ``scale_factor`` is the CRS's point scale at the raster's centre, and
it is applied only where it is more than ``TRUE_SCALE_TOLERANCE`` from 1, as for Web Mercator
and other world projections away from their standard lines.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

from osgeo import osr

from . import get_logger
from .errors import LookalikeError

LOGGER = get_logger("crs")


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


# A projected CRS whose point scale at a raster's centre is within this fraction of 1 counts as
# true to scale there, so ground sizes in metres become CRS lengths by the unit conversion alone.
# That keeps the grids of UTM rasters inside their zone (scale 0.9996 to about 1.001) and of
# national grids such as Lambert-93 (0.999 to 1.003 from 41 to 51 degrees north, as
# scale_factor_at measures it) as they were. Web Mercator exceeds it from about 8.1 degrees of
# latitude on, where 1 / cos(latitude) passes 1.01.
TRUE_SCALE_TOLERANCE = 0.01

# Half the baseline, in CRS metres, of the central differences that measure the point scale. At
# 100 m the rounding of coordinates near 2e7 (about 4e-9 m) and the curvature of the local
# transverse Mercator (about (100 m / 6371 km)^2) both stay below 1e-9 of the result.
_SCALE_STEP_M = 100.0


class GridScale(NamedTuple):
    """The conversion from ground metres to the units of one grid CRS around one raster."""

    # CRS metres per ground metre at the raster's centre; None where the CRS counts as true to
    # scale there (within TRUE_SCALE_TOLERANCE), so that its units are taken as ground lengths.
    scale_factor: Optional[float]
    # Grid CRS units per ground metre: scale_factor (or 1) divided by the metres per CRS unit.
    units_per_metre: float


@functools.lru_cache(maxsize=64)
def metres_per_unit(crs_wkt: str) -> float:
    """Return the length of the CRS's linear unit in metres, e.g. 0.3048006 for the US survey foot."""
    return float(spatial_reference(crs_wkt).GetLinearUnits())


@functools.lru_cache(maxsize=256)
def scale_factor_at(crs_wkt: str, x: float, y: float) -> Optional[float]:
    """Return the point scale of a projected CRS at ``(x, y)``: CRS metres per metre on the ground.

    The scale is the square root of the areal scale, so a square tile scaled by it keeps its
    ground area also where the CRS stretches one axis more than the other (e.g. EPSG:3857 on the
    ellipsoid). Equal-area CRSs have a scale of 1 everywhere under this rule. The ground lengths
    come from a transverse Mercator with scale 1 centred on the point, on the CRS's own datum.

    Returns None for a CRS without a geographic base (an engineering CRS) or where GDAL cannot
    transform the point.
    """
    reference = spatial_reference(crs_wkt)
    if not reference.IsProjected():
        return None
    geographic = reference.CloneGeogCS()
    geographic.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    step = _SCALE_STEP_M / metres_per_unit(crs_wkt)
    try:
        longitude, latitude, _ = osr.CoordinateTransformation(reference, geographic).TransformPoint(x, y)
        if not (math.isfinite(longitude) and math.isfinite(latitude)):
            return None
        local = osr.SpatialReference()
        local.CopyGeogCSFrom(geographic)
        local.SetTM(latitude, longitude, 1.0, 0.0, 0.0)
        local.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        east, west, north, south = osr.CoordinateTransformation(reference, local).TransformPoints(
            [(x + step, y), (x - step, y), (x, y + step), (x, y - step)]
        )
    except RuntimeError as error:
        LOGGER.debug("no point scale for %s at (%r, %r): %s", reference.GetName(), x, y, error)
        return None
    # Ground metres per CRS unit along x and along y: the Jacobian of CRS -> local ground.
    d_east_dx, d_north_dx = (east[0] - west[0]) / (2 * step), (east[1] - west[1]) / (2 * step)
    d_east_dy, d_north_dy = (north[0] - south[0]) / (2 * step), (north[1] - south[1]) / (2 * step)
    areal = abs(d_east_dx * d_north_dy - d_east_dy * d_north_dx)
    if not (math.isfinite(areal) and areal > 0):
        return None
    return metres_per_unit(crs_wkt) / math.sqrt(areal)


def grid_scale(crs_wkt: str, bounds: Sequence[float]) -> GridScale:
    """Return how ground metres map to ``crs_wkt`` units for a raster with ``bounds`` in that CRS.

    The scale is measured at the centre of ``bounds`` and applied only beyond
    TRUE_SCALE_TOLERANCE, so a CRS made for the area keeps its units as ground lengths.
    """
    xmin, ymin, xmax, ymax = bounds
    scale_factor = scale_factor_at(crs_wkt, (xmin + xmax) / 2.0, (ymin + ymax) / 2.0)
    if scale_factor is not None and abs(scale_factor - 1.0) <= TRUE_SCALE_TOLERANCE:
        scale_factor = None
    return GridScale(scale_factor, units_per_metre(crs_wkt, scale_factor))


def units_per_metre(crs_wkt: str, scale_factor: Optional[float]) -> float:
    """Return the ``crs_wkt`` units that span one ground metre where the CRS has ``scale_factor``."""
    return (1.0 if scale_factor is None else scale_factor) / metres_per_unit(crs_wkt)
