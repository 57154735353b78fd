"""Raster layers as sources for the core: a GDAL path when GDAL reads the layer, else a provider copy.

The core reads rasters with GDAL (``core.raster.RasterSource``), and ``core.pipeline`` opens its
sources by path. A layer served by the ``gdal`` provider (GeoTIFF, COG, VRT, /vsi paths) is
indexed through its path. Any other raster layer (XYZ and WMS tiles, WCS, PostGIS rasters...)
is read through :class:`ProviderBlockReader`, which renders blocks from a clone of the layer's
data provider into numpy arrays. :func:`write_provider_raster` uses it to write the indexed
extent to a GeoTIFF beside the index, which the pipeline then reads like any other raster.

The clone is made on the main thread, where the layer lives, and is then used only by the task
that reads it. The layer itself is never touched off the main thread.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsProviderRegistry,
    QgsRasterBlock,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRasterProjector,
    QgsRectangle,
)

from ..core import get_logger
from ..core.errors import CancelledError, RasterError
from ..core.raster import utm_crs_wkt

LOGGER = get_logger("gis.raster_layers")

GDAL_PROVIDER = "gdal"
# A Web Mercator metre is 1 / cos(latitude) ground metres, so tile sizes would drift with
# latitude. Sources in it are written in the local UTM zone instead.
WEB_MERCATOR_AUTHIDS = ("EPSG:3857", "EPSG:900913", "EPSG:3785")

# A pixel with at least this alpha (of 255) counts as image data in colour (ARGB) blocks.
MIN_VALID_ALPHA = 128
# Side of the blocks read from the provider and written to the GeoTIFF.
WRITE_BLOCK_PX = 512
# Suffix of the folder, beside the index folder, that contains rasters written from non-GDAL layers.
RASTERS_FOLDER_SUFFIX = ".rasters"

_NUMPY_TYPES = {
    Qgis.DataType.Byte: np.uint8,
    Qgis.DataType.UInt16: np.uint16,
    Qgis.DataType.Int16: np.int16,
    Qgis.DataType.UInt32: np.uint32,
    Qgis.DataType.Int32: np.int32,
    Qgis.DataType.Float32: np.float32,
    Qgis.DataType.Float64: np.float64,
}
_COLOR_TYPES = (Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied)

Bounds = tuple[float, float, float, float]

# QGIS 3.36 moved the WKT variants to Qgis.CrsWktVariant; QGIS 4 keeps only that home.
if hasattr(Qgis, "CrsWktVariant"):
    _WKT_PREFERRED_GDAL = Qgis.CrsWktVariant.PreferredGdal
else:
    _WKT_PREFERRED_GDAL = QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL


def crs_to_wkt(crs: QgsCoordinateReferenceSystem) -> str:
    """Return the CRS as the WKT flavour that GDAL and OSR read best."""
    return crs.toWkt(_WKT_PREFERRED_GDAL)


@dataclass(frozen=True)
class LayerSourceSpec:
    """Read access to a raster layer for a task: a GDAL path, or a clone of the layer's provider.

    ``provider_uri`` identifies a non-GDAL source as ``<provider key>:<layer source>``.
    """

    layer_name: str
    gdal_path: Optional[str] = None
    provider: Optional[QgsRasterDataProvider] = None
    provider_uri: str = ""

    @property
    def uses_gdal(self) -> bool:
        return self.gdal_path is not None


def gdal_path_of(layer: QgsRasterLayer) -> Optional[str]:
    """Return the path GDAL can open for a ``gdal``-provider layer, or None for other providers."""
    if layer.providerType() != GDAL_PROVIDER:
        return None
    # decodeUri splits QGIS-only options (such as |option:...) off the GDAL path.
    parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
    if parts.get("layerName"):
        # A subdataset: GDAL opens it through the full connection string QGIS stores.
        return layer.source()
    return parts.get("path") or layer.source()


def source_spec_for_layer(layer: Optional[QgsRasterLayer]) -> LayerSourceSpec:
    """Describe how to read ``layer`` off the main thread; call it on the main thread.

    Raises:
        RasterError: the layer is missing or invalid, or its provider cannot be cloned.
    """
    if layer is None or not layer.isValid():
        name = layer.name() if layer is not None else "(none)"
        raise RasterError(f"The raster layer {name!r} is not valid; fix its source or choose another layer.")
    gdal_path = gdal_path_of(layer)
    if gdal_path is not None:
        return LayerSourceSpec(layer_name=layer.name(), gdal_path=gdal_path)
    clone = layer.dataProvider().clone()
    if clone is None:
        raise RasterError(
            f"The data provider of layer {layer.name()!r} ({layer.providerType()}) cannot be copied for "
            "background reading; save the layer as a GeoTIFF and index that instead."
        )
    return LayerSourceSpec(
        layer_name=layer.name(), provider=clone, provider_uri=f"{layer.providerType()}:{layer.source()}"
    )


def rasters_folder_for(index_folder: str) -> Path:
    folder = Path(index_folder)
    return folder.with_name(folder.name + RASTERS_FOLDER_SUFFIX)


def written_raster_path(index_folder: str, provider_uri: str, bounds: Bounds, crs_wkt: str, gsd: float) -> Path:
    """Return the GeoTIFF path for a provider extent; equal inputs give equal paths, so a rerun reuses it."""
    digest = hashlib.sha256(repr((provider_uri, tuple(bounds), crs_wkt, gsd)).encode("utf-8")).hexdigest()
    return rasters_folder_for(index_folder) / f"layer_{digest[:16]}.tif"


def target_crs_wkt(provider_crs: QgsCoordinateReferenceSystem, bounds: Bounds, bounds_crs_wkt: str) -> str:
    """Return the CRS to write a provider raster in: its own when projected, else a UTM zone.

    Geographic and Web Mercator sources get the UTM zone around the centre of ``bounds`` (given
    in ``bounds_crs_wkt``), so that the GSD is in ground metres.
    """
    if not provider_crs.isGeographic() and provider_crs.authid() not in WEB_MERCATOR_AUTHIDS:
        return crs_to_wkt(provider_crs)
    source = QgsCoordinateReferenceSystem.fromWkt(bounds_crs_wkt)
    to_wgs84 = QgsCoordinateTransform(
        source, QgsCoordinateReferenceSystem("EPSG:4326"), QgsCoordinateTransformContext()
    )
    centre = to_wgs84.transform(QgsRectangle(*bounds).center())
    return utm_crs_wkt(centre.x(), centre.y())


class ProviderBlockReader:
    """Reads blocks of a cloned QGIS raster data provider into numpy arrays, reprojecting on the fly.

    Colour providers (XYZ and WMS tiles deliver one ARGB32 band) give three bands, red, green
    and blue, and their alpha gives validity. Numeric providers give all their bands, and a pixel
    is valid when no band is nodata there.
    """

    def __init__(self, provider: QgsRasterDataProvider, description: str) -> None:
        if provider is None or not provider.isValid():
            raise RasterError(f"The raster provider of {description!r} is not valid; check the layer's source.")
        self.description = description
        self._provider = provider
        self.crs = provider.crs()
        if not self.crs.isValid():
            raise RasterError(
                f"The raster {description!r} has no valid CRS; set the layer's CRS before indexing it."
            )
        self._context = QgsCoordinateTransformContext()
        self.is_color = provider.dataType(1) in _COLOR_TYPES
        self.band_count = 3 if self.is_color else provider.bandCount()

    @property
    def gdal_data_type(self) -> int:
        if self.is_color:
            return gdal.GDT_Byte
        numpy_type = _NUMPY_TYPES.get(self._provider.dataType(1), np.float32)
        return gdal.GDT_Byte if numpy_type is np.uint8 else gdal.GDT_Float32

    def read(
        self, bounds: Sequence[float], crs_wkt: str, width_px: int, height_px: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(values float32 (bands, height, width), valid bool (height, width))`` over ``bounds``."""
        xmin, ymin, xmax, ymax = (float(value) for value in bounds)
        if not (xmin < xmax and ymin < ymax):
            raise RasterError(f"bounds {tuple(bounds)!r} are empty or inverted; pass xmin < xmax, ymin < ymax.")
        extent = QgsRectangle(xmin, ymin, xmax, ymax)
        destination = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
        interface = self._provider
        if destination.isValid() and destination != self.crs:
            projector = QgsRasterProjector()
            projector.setInput(self._provider)
            projector.setCrs(self.crs, destination, self._context)
            interface = projector

        if self.is_color:
            block = interface.block(1, extent, width_px, height_px)
            _check_block(block, self.description)
            argb = _block_array(block, np.uint32, width_px, height_px)
            alpha = ((argb >> 24) & 0xFF).astype(np.float32)
            red = ((argb >> 16) & 0xFF).astype(np.float32)
            green = ((argb >> 8) & 0xFF).astype(np.float32)
            blue = (argb & 0xFF).astype(np.float32)
            values = np.stack([red, green, blue])
            if block.dataType() == Qgis.DataType.ARGB32_Premultiplied:
                safe_alpha = np.where(alpha > 0, alpha, 1.0)
                values = np.clip(values * 255.0 / safe_alpha, 0, 255)
            return values.astype(np.float32), alpha >= MIN_VALID_ALPHA

        bands = []
        valid = np.ones((height_px, width_px), dtype=bool)
        for band in range(1, self.band_count + 1):
            block = interface.block(band, extent, width_px, height_px)
            _check_block(block, self.description)
            numpy_type = _NUMPY_TYPES.get(block.dataType())
            if numpy_type is None:
                raise RasterError(
                    f"Band {band} of {self.description!r} has a data type Lookalike cannot read; "
                    "save the layer as a GeoTIFF and index that."
                )
            band_values = _block_array(block, numpy_type, width_px, height_px).astype(np.float32)
            valid &= _block_validity(block, band_values)
            bands.append(band_values)
        return np.stack(bands), valid


def write_provider_raster(
    reader: ProviderBlockReader,
    bounds: Bounds,
    crs_wkt: str,
    gsd: float,
    path: Path,
    progress: Optional[Callable[[int, int], None]] = None,
    is_cancelled: Optional[Callable[[], bool]] = None,
) -> Path:
    """Write ``bounds`` (in ``crs_wkt``) of a provider to a tiled GeoTIFF at ``gsd`` CRS units per pixel.

    The file gets the image bands plus an alpha band that marks valid pixels, which
    ``core.raster`` uses as validity. It is written under a temporary name and renamed when
    complete, so an existing file at ``path`` is always whole and is reused as is.

    Raises:
        RasterError: the extent is too large or a block cannot be read.
        CancelledError: ``is_cancelled`` returned True.
    """
    if path.is_file():
        LOGGER.info("Reusing %s, written earlier from %s", path, reader.description)
        return path
    xmin, ymin, xmax, ymax = bounds
    width_px = max(1, math.ceil((xmax - xmin) / gsd))
    height_px = max(1, math.ceil((ymax - ymin) / gsd))
    # GeoTIFF without BigTIFF is limited to 4 GiB; refuse a size that only a typo produces.
    if width_px * height_px > 40000 * 40000:
        raise RasterError(
            f"Writing {reader.description!r} over {width_px} x {height_px} pixels is too large; choose a "
            "smaller extent (current map view or polygons) or a larger GSD."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_suffix(".partial.tif")
    driver = gdal.GetDriverByName("GTiff")
    dataset = driver.Create(
        str(partial_path), width_px, height_px, reader.band_count + 1, reader.gdal_data_type,
        options=["TILED=YES", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"],
    )
    if dataset is None:
        raise RasterError(f"GDAL cannot create {partial_path}; check that the folder is writable.")
    dataset.SetGeoTransform((xmin, gsd, 0.0, ymin + height_px * gsd, 0.0, -gsd))
    dataset.SetProjection(crs_wkt)
    dataset.GetRasterBand(reader.band_count + 1).SetColorInterpretation(gdal.GCI_AlphaBand)
    if reader.band_count == 3:
        for band, interpretation in zip((1, 2, 3), (gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)):
            dataset.GetRasterBand(band).SetColorInterpretation(interpretation)

    top = ymin + height_px * gsd
    blocks = [(x, y) for y in range(0, height_px, WRITE_BLOCK_PX) for x in range(0, width_px, WRITE_BLOCK_PX)]
    try:
        for done, (x, y) in enumerate(blocks):
            if is_cancelled is not None and is_cancelled():
                raise CancelledError(f"Reading {reader.description!r} was cancelled.")
            block_width = min(WRITE_BLOCK_PX, width_px - x)
            block_height = min(WRITE_BLOCK_PX, height_px - y)
            block_bounds = (
                xmin + x * gsd, top - (y + block_height) * gsd, xmin + (x + block_width) * gsd, top - y * gsd
            )
            values, valid = reader.read(block_bounds, crs_wkt, block_width, block_height)
            for band_number, band_values in enumerate(values, start=1):
                dataset.GetRasterBand(band_number).WriteArray(band_values, x, y)
            dataset.GetRasterBand(reader.band_count + 1).WriteArray(valid.astype(np.uint8) * 255, x, y)
            if progress is not None:
                progress(done + 1, len(blocks))
        dataset.FlushCache()
        dataset = None
    except BaseException:
        dataset = None
        partial_path.unlink(missing_ok=True)
        raise
    partial_path.replace(path)
    LOGGER.info("Wrote %s (%d x %d px, gsd %g) from %s", path, width_px, height_px, gsd, reader.description)
    return path


def _check_block(block: Optional[QgsRasterBlock], description: str) -> None:
    if block is None or not block.isValid() or block.isEmpty():
        raise RasterError(
            f"Reading a block of {description!r} failed; check that the layer's server or tile folder is "
            "reachable."
        )


def _block_array(block: QgsRasterBlock, numpy_type: Any, width_px: int, height_px: int) -> np.ndarray:
    return np.frombuffer(bytes(block.data()), dtype=numpy_type).reshape(height_px, width_px).copy()


def _block_validity(block: QgsRasterBlock, values: np.ndarray) -> np.ndarray:
    if not block.hasNoData():
        return np.ones(values.shape, dtype=bool)
    if block.hasNoDataValue():
        return values != np.float32(block.noDataValue())
    # Nodata held as a per-pixel bitmap (e.g. outside a reprojected source); PyQGIS 3.22 has no
    # vectorised access to it.
    height, width = values.shape
    flags = [not block.isNoData(row, col) for row in range(height) for col in range(width)]
    return np.asarray(flags, dtype=bool).reshape(height, width)
