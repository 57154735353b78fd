"""Pieces every Lookalike algorithm shares: the base class, core error translation, progress and
cancellation adapters, and raster-layer inputs.

Nothing here repeats engine logic: the algorithms only turn Processing parameters into the core's
arguments and the core's results into Processing outputs.
"""

from __future__ import annotations

import os
import re
import shlex
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional, Sequence

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeatureRequest,
    QgsFeatureSource,
    QgsGeometry,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProcessingFeedback,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QCoreApplication

from ..core import dependencies as core_dependencies
from ..core.errors import LookalikeError, mentioned_name_pattern, with_field_names
from ..core.raster import open_raster_quietly
from ..gis import dependencies
from ..gis.raster_layers import crs_to_wkt, gdal_path_of
from .compat import SKIP_GEOMETRY_CHECKS

GROUP_ID = "similarity"
GROUP_NAME = "Similarity search"

# Algorithms that need only GDAL and QGIS (export, index info) leave out the packages they do
# not import; building and searching need both.
ENCODER_PACKAGES = ("onnxruntime",)
INDEX_PACKAGES = ("hnswlib",)

# The file dialog's filter for ENCODER. A file of another name can still be typed in, and is then checked.
ENCODER_FILE_FILTER = "ONNX models (*.onnx);;All files (*)"


class LookalikeAlgorithm(QgsProcessingAlgorithm):
    """Base of the Lookalike algorithms: group, instance creation and generated help.

    Subclasses set ``ALGORITHM_ID``, ``DISPLAY_NAME`` and ``SUMMARY`` and give every parameter a
    help text with ``setHelp``. ``shortHelpString`` lists those texts, so the toolbox dialog,
    ``qgis_process help`` and the parameter tooltips read the same words.
    """

    ALGORITHM_ID = ""
    DISPLAY_NAME = ""
    SUMMARY = ""
    # Unit and meaning of numeric parameters, keyed by parameter name, appended to their
    # out-of-range messages.
    VALUE_HINTS: Mapping[str, str] = {}
    # Numeric parameters that must be greater than their minimum of 0. Their definitions keep the
    # minimum 0, because the GUI widgets take only an inclusive minimum.
    POSITIVE_NUMBERS: frozenset[str] = frozenset()

    def name(self) -> str:
        return self.ALGORITHM_ID

    def displayName(self) -> str:  # noqa: N802 - QGIS API
        return tr(self.DISPLAY_NAME)

    def group(self) -> str:
        return tr(GROUP_NAME)

    def groupId(self) -> str:  # noqa: N802 - QGIS API
        return GROUP_ID

    def createInstance(self) -> QgsProcessingAlgorithm:  # noqa: N802 - QGIS API
        return type(self)()

    def checkParameterValues(  # noqa: N802 - QGIS API
        self, parameters: dict, context: QgsProcessingContext
    ) -> tuple[bool, str]:
        """Reject invalid values with a message that names the parameter, the value and the fix.

        QGIS's own check, which runs afterwards, only reports "Incorrect parameter value for K".
        """
        # Imported here because parameter_checks imports tr from this module.
        from .parameter_checks import invalid_value_message

        for definition in self.parameterDefinitions():
            name = definition.name()
            message = invalid_value_message(
                definition, parameters.get(name), context, self.VALUE_HINTS.get(name, ""),
                positive=name in self.POSITIVE_NUMBERS,
            )
            if message is not None:
                return False, message
        return super().checkParameterValues(parameters, context)

    def shortHelpString(self) -> str:  # noqa: N802 - QGIS API
        """Return the summary and one line per parameter, as plain text.

        ``qgis_process help`` prints this text unchanged, and the toolbox dialog wraps each line in
        an HTML paragraph without escaping it (QGIS 3.22 to 3.44). Plain lines read well in both,
        so the texts contain no HTML markup and no "<" or "&".
        """
        lines = [tr(self.SUMMARY)]
        definitions = [definition for definition in self.parameterDefinitions() if definition.help()]
        if definitions:
            lines.append("")
            for definition in definitions:
                lines.append(f"{definition.description()} ({definition.name()}): {definition.help()}")
        return "\n".join(lines)


def tr(text: str) -> str:
    return QCoreApplication.translate("Lookalike", text)


def require_packages(import_names: Sequence[str]) -> None:
    """Raise QgsProcessingException when a runtime package the algorithm needs cannot be imported.

    Packages installed by the plugin's Install action live in a profile folder that the plugin
    adds to ``sys.path`` when it starts. It is added here as well, for a provider registered
    without the plugin, as in a standalone script.
    """
    dependencies.add_packages_folder_to_path()
    missing = core_dependencies.missing_packages(import_names)
    if not missing:
        return
    requirements = " ".join(shlex.quote(requirement) for requirement in core_dependencies.requirements_for(missing))
    raise QgsProcessingException(
        tr(
            f"Lookalike needs the Python package(s) {', '.join(missing)}, which QGIS's Python "
            "cannot import. In QGIS, click Install in the Lookalike message bar (shown when the "
            "plugin starts), or install them into the folder the plugin reads with: "
            f"python3 -m pip install --target {shlex.quote(str(dependencies.packages_folder()))} --no-deps "
            f"{requirements}"
        )
    )


# A Processing parameter's name, such as INPUT_RASTERS.
PARAMETER_NAME_PATTERN = re.compile(r"[A-Z][A-Z0-9_]*")


@contextmanager
def core_errors(parameter_names: Optional[Mapping[str, str]] = None) -> Iterator[None]:
    """Re-raise the core's LookalikeError (cancellation included) as QgsProcessingException.

    The core's messages already name the invalid value and the fix, in the core's own argument
    names. ``parameter_names`` maps those names to the algorithm's parameters, and the mapping of
    each core name a message mentions is appended, so the fix can be applied in Processing.
    """
    try:
        yield
    except LookalikeError as error:
        raise QgsProcessingException(with_parameter_names(str(error), parameter_names)) from error


def with_parameter_names(message: str, parameter_names: Optional[Mapping[str, str]] = None) -> str:
    """Name the algorithm's parameters in a core message instead of the core's arguments.

    A core argument that one parameter sets is replaced by that parameter's name, as
    ``qgis_process`` takes it. For the others, such as a tile size given in one of two units,
    a sentence that explains how to set them is appended.
    """
    explained = {}
    for core_name, parameter in (parameter_names or {}).items():
        if PARAMETER_NAME_PATTERN.fullmatch(parameter):
            message = mentioned_name_pattern(core_name).sub(parameter, message)
        else:
            explained[core_name] = parameter
    return with_field_names(message, explained, tr("this algorithm"))


def cancel_check(feedback: Optional[QgsProcessingFeedback]) -> Callable[[], bool]:
    """Return the ``is_cancelled`` callable the core polls between batches."""
    if feedback is None:
        return lambda: False
    return feedback.isCanceled


def set_progress(
    feedback: Optional[QgsProcessingFeedback], done: float, total: float, start: float = 0.0, end: float = 100.0
) -> None:
    """Map ``done`` of ``total`` onto the percentage span ``start``..``end``; a zero total shows ``start``."""
    if feedback is None:
        return
    fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    feedback.setProgress(start + (end - start) * fraction)


def gdal_source_path(layer: Optional[QgsRasterLayer], parameter_name: str) -> str:
    """Return the GDAL dataset name of a raster layer, for the core's GDAL reader.

    Web and virtual layers (WMS, XYZ, WCS, in-memory) have no GDAL source the core can open, so
    they are rejected with the name of the layer and the fix.
    """
    if layer is None or not layer.isValid():
        raise QgsProcessingException(
            tr(f"The raster given for {parameter_name} is missing or invalid; choose a raster layer or a file.")
        )
    path = gdal_path_of(layer)
    if path is None:
        raise QgsProcessingException(
            tr(
                f"The raster layer {layer.name()!r} given for {parameter_name} comes from the "
                f"{layer.providerType()!r} data provider, but Processing can only read rasters "
                "that GDAL opens (files, GeoPackage rasters, VRTs). Save the layer to a GeoTIFF "
                "(Export > Save As…) and use that file, or use the Lookalike panel."
            )
        )
    return path


# How to give a CRS to an extent typed as text, which has no layer whose CRS could be set.
EXTENT_CRS_FIX = (
    "add the CRS after the coordinates, as in 'xmin,xmax,ymin,ymax [EPSG:32610]', or take the extent from a "
    "layer or the map, which carry their CRS"
)


def crs_wkt(crs: QgsCoordinateReferenceSystem, parameter_name: str,
            fix: str = "set the layer's CRS (Layer Properties > Source)") -> str:
    """Return a CRS as the GDAL-flavoured WKT the core's OSR calls read.

    ``fix`` is the advice the error gives when the CRS is invalid.
    """
    if not crs.isValid():
        raise QgsProcessingException(tr(f"The CRS of {parameter_name} is unknown; {fix}."))
    return crs_to_wkt(crs)


def geometry_wkt(geometry: QgsGeometry) -> str:
    """Return 2D WKT with straight segments, which OGR parses for every QGIS geometry type."""
    flat = QgsGeometry(geometry)
    flat.convertToStraightSegment()
    abstract = flat.get()
    abstract.dropZValue()
    abstract.dropMValue()
    return flat.asWkt()


def features_of(source: QgsFeatureSource):
    """Return the features of ``source``, invalid geometries included.

    The algorithms repair self-intersecting polygons themselves, keeping everything their rings
    enclose. QGIS's default "invalid features filtering" would instead stop the algorithm on
    such a feature when it runs from the toolbox or from processing.run.
    """
    if isinstance(source, QgsProcessingFeatureSource):
        return source.getFeatures(QgsFeatureRequest(), SKIP_GEOMETRY_CHECKS)
    return source.getFeatures()


def feature_geometries_wkt(source: QgsFeatureSource, parameter_name: str) -> list[str]:
    """Return the WKT of every non-empty geometry of a feature source, in the source's CRS."""
    geometries = []
    for feature in features_of(source):
        geometry = feature.geometry()
        if geometry is None or geometry.isEmpty():
            continue
        # The core repairs self-intersecting polygons and keeps everything their rings enclose,
        # whereas QGIS's makeValid() drops the centre of a star. So only what no repair saves is rejected.
        if not geometry.isGeosValid() and geometry.makeValid().isEmpty():
            raise QgsProcessingException(
                tr(f"Feature {feature.id()} of {parameter_name} has an invalid geometry that cannot be "
                   "repaired; fix it with 'Fix geometries' first.")
            )
        geometries.append(geometry_wkt(geometry))
    return geometries


def same_file(first: str, second: str) -> bool:
    """Return whether two paths name the same file, following symlinks (and hard links when both exist)."""
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    return os.path.normcase(os.path.realpath(first)) == os.path.normcase(os.path.realpath(second))


def reject_output_in_folder(output_path: str, output_name: str, folder: str, folder_name: str) -> None:
    """Raise QgsProcessingException when an output path is ``folder`` or lies inside it.

    Symlinks are resolved first, so a link to the folder does not hide it. The algorithms keep
    their outputs out of the index folder, because an output there could replace an index file.
    """
    if not output_path or not folder:
        return
    real_output = os.path.normcase(os.path.realpath(output_path))
    real_folder = os.path.normcase(os.path.realpath(folder))
    try:
        inside = os.path.commonpath([real_output, real_folder]) == real_folder
    except ValueError:
        # Paths on different Windows drives have no common path.
        inside = False
    if inside:
        raise QgsProcessingException(tr(
            f"{output_name}: {output_path} is inside the index folder {folder} given for {folder_name}, "
            "where writing it could replace a file of the index. Choose a file outside that folder."
        ))


def reject_output_in_any_index(output_path: str, output_name: str, is_folder: bool = False) -> None:
    """Raise QgsProcessingException when an output path is in a folder Lookalike owns, or is one.

    This covers the indexes not given to the algorithm, such as another index's manifest.json
    given as OUTPUT_JSON, and checkpoint folders (see ``check_output_outside_lookalike_folders``).
    ``is_folder`` marks an output folder, which must not be such a folder either.
    """
    if not output_path:
        return
    from ..core.index import check_output_outside_lookalike_folders

    try:
        check_output_outside_lookalike_folders(output_path, is_folder)
    except LookalikeError as error:
        raise QgsProcessingException(tr(f"{output_name}: {error}.")) from error


# Sidecar files GDAL and other GIS programs keep beside a raster, whatever GDAL's settings.
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".msk")


def raster_files(raster_path: str) -> list[str]:
    """Return the files a raster consists of: its path and GDAL's file list for the dataset.

    The file list adds sidecars (.ovr, .aux.xml) and the rasters a VRT reads, and the file of a
    GeoPackage raster, whose GDAL path is ``GPKG:file:table``. A raster GDAL cannot open (moved or
    deleted since the index was built) contributes only its path.
    """
    # GDAL leaves the .aux.xml sidecar out of the list when GDAL_PAM_ENABLED=NO, although the file
    # (written by another program, or before PAM was turned off) is still part of the raster.
    files = [raster_path, *(raster_path + suffix for suffix in SIDECAR_SUFFIXES)]
    dataset = open_raster_quietly(raster_path)
    if dataset is not None:
        files.extend(dataset.GetFileList() or [])
    return files


def reject_outputs_over_rasters(
    output_paths: Sequence[str], output_name: str, raster_paths: Sequence[str], rasters_name: str
) -> None:
    """Raise QgsProcessingException when an output path is one of the files of an input raster.

    Paths are compared with :func:`same_file`, so a symlink or hard link to a raster is caught.
    ``rasters_name`` names where the rasters come from, e.g. "the index given for INDEX".
    """
    for raster_path in dict.fromkeys(raster_paths):
        for raster_file in raster_files(raster_path):
            for output_path in output_paths:
                if output_path and same_file(output_path, raster_file):
                    target = (f"the raster {raster_path}" if same_file(raster_file, raster_path)
                              else f"the file {raster_file} of the raster {raster_path}")
                    raise QgsProcessingException(tr(
                        f"{output_name}: {output_path} is {target} in {rasters_name}, and writing it would "
                        "replace that file. Choose another output path."
                    ))
