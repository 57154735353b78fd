"""The ``lookalike`` Processing provider."""

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon


class LookalikeProvider(QgsProcessingProvider):
    """Registers the Lookalike algorithms under the stable provider id ``lookalike``."""

    def id(self) -> str:
        return "lookalike"

    def name(self) -> str:
        return "Lookalike"

    def icon(self) -> QIcon:
        return QIcon(str(Path(__file__).resolve().parent.parent / "icon.svg"))

    def loadAlgorithms(self) -> None:  # noqa: N802 - QGIS API
        # The algorithm modules import only the headless core lazily, so the provider loads
        # even when onnxruntime or hnswlib are missing; running an algorithm then reports them.
        for algorithm_class in _algorithm_classes():
            self.addAlgorithm(algorithm_class())


def _algorithm_classes() -> list:
    from .build_index import BuildIndexAlgorithm
    from .export_chips import ExportChipsAlgorithm
    from .index_info import IndexInfoAlgorithm
    from .search import SearchAlgorithm

    return [BuildIndexAlgorithm, SearchAlgorithm, ExportChipsAlgorithm, IndexInfoAlgorithm]
