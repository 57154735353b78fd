"""Memory: peak RSS of a build over a raster and over one 16 times its area.

Both rasters are tiled, DEFLATE-compressed GeoTIFFs written from the same NAIP scene: one copy,
and 4 x 4 copies edge to edge, so the larger one has the same content density and 16 times the
area. A third build reads the 4 x 4 mosaic as a VRT of 16 files. GDAL keeps each file of a VRT
open with its own buffers once it has been read, so that build shows a cost per file, not per
area. Each build runs in its own process and reports ``ru_maxrss``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from osgeo import gdal

from .common import CACHE_DIR, log
from .datasets import PIPELINE_RASTER, with_gdal_exceptions, write_tiled_vrt

WORKER = Path(__file__).resolve().parent / "memory_worker.py"
AREA_FACTOR_SIDE = 4


def _build_in_subprocess(source: Path, index_folder: Path, encoder_path: Path,
                         tile_size_source_px: float) -> dict[str, Any]:
    # Linux carries the launching process's peak RSS into ru_maxrss across exec when the child
    # is started with vfork, as subprocess does, so this process's own peak would leak into the
    # figure. sh forks the worker as a new child of its own (the trailing "exit" keeps it from
    # exec'ing in place), and sh's small footprint is all that can carry over.
    command = [
        "/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, str(WORKER),
        str(source), str(index_folder), str(encoder_path), repr(tile_size_source_px),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory worker failed on {source} (exit {completed.returncode}):\n{completed.stderr[-2000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@with_gdal_exceptions
def _as_geotiff(vrt: Path) -> Path:
    """Write ``vrt`` as a tiled, DEFLATE-compressed GeoTIFF beside it, as imagery is usually delivered."""
    output = vrt.with_suffix(".tif")
    gdal.Translate(str(output), str(vrt), format="GTiff",
                   creationOptions=["TILED=YES", "COMPRESS=DEFLATE", "BLOCKXSIZE=512", "BLOCKYSIZE=512"])
    return output


def run(encoder_path: Path, tile_size_source_px: float) -> dict[str, Any]:
    """Build over the single and the 4 x 4 mosaic, each in a fresh process; return both and the ratio."""
    workdir = Path(tempfile.mkdtemp(prefix="memory_", dir=CACHE_DIR / "scratch"))
    try:
        single = _as_geotiff(write_tiled_vrt(PIPELINE_RASTER, workdir / "single" / "single.vrt", 1))
        large_vrt = write_tiled_vrt(PIPELINE_RASTER, workdir / "large" / "large.vrt", AREA_FACTOR_SIDE)
        large = _as_geotiff(large_vrt)
        builds = {}
        for name, source in (("single", single), ("large", large), ("large_vrt", large_vrt)):
            builds[name] = _build_in_subprocess(source, workdir / f"index_{name}", encoder_path,
                                                tile_size_source_px)
            build = builds[name]
            log(f"memory: {name}: {build['tiles_embedded']} tiles, peak RSS {build['peak_rss_mib']:.0f} MiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "raster": str(PIPELINE_RASTER.relative_to(PIPELINE_RASTER.parents[2])),
        "area_factor": AREA_FACTOR_SIDE**2,
        "encoder_file": encoder_path.name,
        "tile_size_source_px": tile_size_source_px,
        "single": builds["single"],
        "large": builds["large"],
        "large_vrt": builds["large_vrt"],
        "large_vrt_files": AREA_FACTOR_SIDE**2,
        "ratio": builds["large"]["peak_rss_mib"] / builds["single"]["peak_rss_mib"],
    }
