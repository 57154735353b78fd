"""``lookalike:indexinfo``: report what an index folder's manifest records."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
)

from ..core.files import open_temporary_beside
from ..core.grid import TileGrid
from ..core.index import TileIndex
from ..core.query import changed_source_warnings
from ..core.raster import is_missing_local_file
from .compat import FILE_FOLDER
from .support import (
    INDEX_PACKAGES,
    LookalikeAlgorithm,
    core_errors,
    reject_output_in_any_index,
    reject_output_in_folder,
    reject_outputs_over_rasters,
    require_packages,
    tr,
)

# An existing report with this title near its start was written by this algorithm and may be replaced.
REPORT_TITLE = "<title>Lookalike index</title>"
HTML_MARKER_SEARCH_CHARS = 512


class IndexInfoAlgorithm(LookalikeAlgorithm):
    """Summarise an index folder: encoder, tile grid, sources and counts, as outputs, HTML and JSON."""

    ALGORITHM_ID = "indexinfo"
    DISPLAY_NAME = "Index information"
    SUMMARY = (
        "Opens an index folder, checks that its files agree with its manifest, and reports the "
        "encoder, tile grid, rasters and tile counts it records. The HTML report opens in the "
        "Results Viewer; the JSON file is the complete manifest."
    )

    INDEX = "INDEX"
    OUTPUT_HTML = "OUTPUT_HTML"
    OUTPUT_JSON = "OUTPUT_JSON"

    TILE_COUNT = "TILE_COUNT"
    SOURCE_COUNT = "SOURCE_COUNT"
    SOURCE_PATHS = "SOURCE_PATHS"
    ENCODER_NAME = "ENCODER_NAME"
    ENCODER_CHECKSUM = "ENCODER_CHECKSUM"
    EMBEDDING_DIM = "EMBEDDING_DIM"
    METRIC = "METRIC"
    FORMAT_VERSION = "FORMAT_VERSION"
    TILE_SIZE_PX = "TILE_SIZE_PX"
    STRIDE_PX = "STRIDE_PX"
    GSD = "GSD"
    TILE_GROUND_SIZE = "TILE_GROUND_SIZE"
    GSD_GRID_UNITS = "GSD_GRID_UNITS"
    TILE_SIZE_GRID_UNITS = "TILE_SIZE_GRID_UNITS"
    GRID_CRS = "GRID_CRS"
    CREATED_AT = "CREATED_AT"
    UPDATED_AT = "UPDATED_AT"

    def initAlgorithm(self, config: Optional[dict] = None) -> None:  # noqa: N802 - QGIS API
        index = QgsProcessingParameterFile(self.INDEX, tr("Index folder"), FILE_FOLDER)
        index.setHelp(tr("Folder written by 'Build similarity index' (it contains manifest.json)."))
        self.addParameter(index)

        report = QgsProcessingParameterFileDestination(
            self.OUTPUT_HTML, tr("Report (HTML)"), tr("HTML files (*.html)"), optional=True
        )
        report.setHelp(tr("HTML summary of the index. Not written when left empty (the default in qgis_process)."))
        self.addParameter(report)

        manifest = QgsProcessingParameterFileDestination(
            self.OUTPUT_JSON, tr("Manifest (JSON)"), tr("JSON files (*.json)"), optional=True,
            createByDefault=False,
        )
        manifest.setHelp(tr("Copy of the index's manifest.json as it was read, for scripts."))
        self.addParameter(manifest)

        numbers = (
            (self.TILE_COUNT, "Tiles in the index"),
            (self.SOURCE_COUNT, "Rasters in the index"),
            (self.EMBEDDING_DIM, "Embedding dimension"),
            (self.FORMAT_VERSION, "Index format version"),
            (self.TILE_SIZE_PX, "Tile size (encoder pixels)"),
            (self.STRIDE_PX, "Stride between tiles (encoder pixels)"),
            # GSD and TILE_GROUND_SIZE are in metres, the unit of buildindex's GSD and TILE_SIZE.
            (self.GSD, "GSD of the first grid (metres on the ground per encoder pixel)"),
            (self.TILE_GROUND_SIZE, "Tile side of the first grid (metres on the ground)"),
            (self.GSD_GRID_UNITS, "GSD of the first grid (grid CRS units per encoder pixel)"),
            (self.TILE_SIZE_GRID_UNITS, "Tile side of the first grid (grid CRS units)"),
        )
        for name, description in numbers:
            self.addOutput(QgsProcessingOutputNumber(name, tr(description)))
        strings = (
            (self.SOURCE_PATHS, "Raster paths, separated by ';' (OUTPUT_JSON lists them one by one)"),
            (self.ENCODER_NAME, "Encoder name"),
            (self.ENCODER_CHECKSUM, "Encoder SHA-256"),
            (self.METRIC, "Similarity metric"),
            (self.GRID_CRS, "CRS of the first grid"),
            (self.CREATED_AT, "Created (UTC)"),
            (self.UPDATED_AT, "Last updated (UTC)"),
        )
        for name, description in strings:
            self.addOutput(QgsProcessingOutputString(name, tr(description)))

    def processAlgorithm(  # noqa: N802 - QGIS API
        self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> dict[str, Any]:
        require_packages(INDEX_PACKAGES)
        index_folder = self.parameterAsFile(parameters, self.INDEX, context)
        html_path = self.parameterAsFileOutput(parameters, self.OUTPUT_HTML, context)
        json_path = self.parameterAsFileOutput(parameters, self.OUTPUT_JSON, context)
        for name, path in ((self.OUTPUT_HTML, html_path), (self.OUTPUT_JSON, json_path)):
            reject_output_in_folder(path, name, index_folder, self.INDEX)
            reject_output_in_any_index(path, name)
        with core_errors({"index folder": self.INDEX}):
            index = TileIndex.open(index_folder)
        manifest = index.manifest
        encoder = index.encoder_info
        sources = index.sources
        source_paths = [str(source["path"]) for source in sources]
        for name, path in ((self.OUTPUT_HTML, html_path), (self.OUTPUT_JSON, json_path)):
            reject_outputs_over_rasters([path], name, source_paths, f"the index given for {self.INDEX}")
        if html_path and json_path and os.path.abspath(html_path) == os.path.abspath(json_path):
            raise QgsProcessingException(tr(
                f"{self.OUTPUT_HTML} and {self.OUTPUT_JSON} are the same file {html_path}; give each its own file."
            ))
        for name, path in ((self.OUTPUT_HTML, html_path), (self.OUTPUT_JSON, json_path)):
            try:
                is_folder = bool(path) and Path(path).is_dir()
            except OSError as error:
                raise QgsProcessingException(tr(
                    f"{name}: {path} cannot be checked ({error.strerror or error}); choose another file."
                )) from error
            if is_folder:
                raise QgsProcessingException(tr(f"{name}: {path} is a folder; give the name of a file to write."))
        _reject_foreign_file(html_path, self.OUTPUT_HTML, _is_own_html_report, "an index report")
        index_id = str(index.manifest.get("index_id") or "")
        _reject_foreign_file(json_path, self.OUTPUT_JSON, lambda path: _is_manifest_copy(path, index_id),
                             "a copy of this index's manifest")

        # The report lists what the manifest records, and these warnings name the rasters that no longer match it.
        for path in source_paths:
            if is_missing_local_file(path):
                feedback.pushWarning(tr(f"Raster {path} of this index is missing; search cannot read queries from it "
                                        "until it is back at that path."))
        for warning in changed_source_warnings(index):
            feedback.pushWarning(tr(warning))

        results: dict[str, Any] = {
            self.TILE_COUNT: index.count,
            self.SOURCE_COUNT: len(sources),
            self.SOURCE_PATHS: ";".join(source_paths),
            self.ENCODER_NAME: encoder.get("name", ""),
            self.ENCODER_CHECKSUM: encoder.get("checksum", ""),
            self.EMBEDDING_DIM: index.embedding_dim,
            self.METRIC: index.metric,
            self.FORMAT_VERSION: manifest.get("format_version"),
            self.CREATED_AT: manifest.get("created_at", ""),
            self.UPDATED_AT: manifest.get("updated_at", ""),
        }
        if sources:
            grid = TileGrid.from_dict(sources[0]["grid"])
            results.update({
                self.TILE_SIZE_PX: grid.tile_size_px,
                self.STRIDE_PX: grid.stride_px,
                self.GSD: grid.gsd_m,
                self.TILE_GROUND_SIZE: grid.tile_ground_size_m,
                self.GSD_GRID_UNITS: grid.gsd,
                self.TILE_SIZE_GRID_UNITS: grid.tile_ground_size,
                self.GRID_CRS: _crs_name(grid.crs_wkt),
            })
        for name, value in results.items():
            feedback.pushInfo(f"{name}: {value}")

        if html_path:
            _write_text(html_path, _html_report(index_folder, results, sources), self.OUTPUT_HTML)
            results[self.OUTPUT_HTML] = html_path
        if json_path:
            _write_text(json_path, json.dumps(manifest, indent=2), self.OUTPUT_JSON)
            results[self.OUTPUT_JSON] = json_path
        return results


def _reject_foreign_file(path: str, parameter_name: str, is_own: Callable[[str], bool], kind: str) -> None:
    """Reject replacing an existing file that this algorithm did not write; qgis_process cannot ask first."""
    if not path or not Path(path).exists() or is_own(path):
        return
    raise QgsProcessingException(tr(
        f"{parameter_name}: {path} exists and is not {kind} that Lookalike wrote, so writing there would "
        "replace it. Choose another file, or delete that file first."
    ))


def _is_own_html_report(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            head = stream.read(HTML_MARKER_SEARCH_CHARS)
    except OSError:
        return False
    return REPORT_TITLE in head


def _is_manifest_copy(path: str, index_id: str) -> bool:
    """Tell whether ``path`` is a copy of the manifest of the index ``index_id``, outside any index folder."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and bool(index_id) and content.get("index_id") == index_id


def _crs_name(crs_wkt: str) -> str:
    crs = QgsCoordinateReferenceSystem.fromWkt(crs_wkt)
    if crs.isValid() and crs.authid():
        return f"{crs.authid()} ({crs.description()})"
    return crs.description() if crs.isValid() else crs_wkt[:80]


def _write_text(path: str, text: str, parameter_name: str) -> None:
    # Written beside the target and renamed over it, so that a hard link to the old file, such as
    # another index's manifest, keeps its content.
    target = Path(path)
    if not target.parent.is_dir():
        raise QgsProcessingException(tr(
            f"{parameter_name}: the folder {target.parent} does not exist; create it or choose a file in another "
            "folder."
        ))
    temporary: Optional[Path] = None
    try:
        stream, temporary = open_temporary_beside(target)
        with stream:
            stream.write(text)
        os.replace(temporary, target)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise QgsProcessingException(
            tr(f"Writing {parameter_name} to {path} failed ({error}); choose a writable file.")
        ) from error


def _html_report(index_folder: str, results: dict[str, Any], sources: list[dict[str, Any]]) -> str:
    summary_rows = "\n".join(
        f"<tr><th align='left'>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"
        for name, value in results.items()
        if name != IndexInfoAlgorithm.SOURCE_PATHS
    )
    source_rows = []
    for source in sources:
        grid = TileGrid.from_dict(source["grid"])
        skipped = source.get("skipped_counts", {})
        skipped_text = ", ".join(f"{reason} {count}" for reason, count in skipped.items()) or "–"
        source_rows.append(
            "<tr>"
            f"<td>{source['id']}</td>"
            f"<td>{html.escape(str(source['path']))}</td>"
            f"<td>{html.escape(_crs_name(grid.crs_wkt))}</td>"
            f"<td>{grid.n_rows} x {grid.n_cols}</td>"
            f"<td>{source.get('tile_count', 0)}</td>"
            f"<td>{html.escape(skipped_text)}</td>"
            f"<td>{html.escape(str(source.get('band_indexes', '')))}</td>"
            "</tr>"
        )
    return (
        f"<html><head><meta charset='utf-8'>{REPORT_TITLE}</head><body>"
        f"<h2>Lookalike index {html.escape(index_folder)}</h2>"
        f"<table border='1' cellspacing='0' cellpadding='3'>{summary_rows}</table>"
        "<h3>Rasters</h3><table border='1' cellspacing='0' cellpadding='3'>"
        "<tr><th>id</th><th>path</th><th>grid CRS</th><th>grid rows x cols</th><th>tiles embedded</th>"
        "<th>tiles skipped</th><th>bands</th></tr>"
        + "\n".join(source_rows)
        + "</table></body></html>"
    )
