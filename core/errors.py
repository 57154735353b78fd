"""Exceptions raised by the core, each carrying a message an analyst can act on."""


class LookalikeError(Exception):
    """Base class for every error the engine raises on purpose.

    ``str(error)`` is a complete sentence naming the invalid value and the fix; it is shown in the
    message bar, in Processing's log and on the command line as is.
    """


class EncoderError(LookalikeError):
    """The ONNX encoder file or its model spec cannot be used."""


class RasterError(LookalikeError):
    """A raster cannot be opened or read as requested."""


class GridError(LookalikeError):
    """Tile-grid parameters are invalid."""


class SearchIndexError(LookalikeError):
    """An index folder is missing, damaged, of another format version or built with another encoder."""


class SearchError(LookalikeError):
    """A query cannot be run against the index."""


class CancelledError(LookalikeError):
    """The user cancelled a long-running job."""
