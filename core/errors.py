"""Exceptions raised by the core, each carrying a message an analyst can act on."""

import re
from typing import Mapping, Optional


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


class OtherBuildCheckpointsError(SearchIndexError):
    """The checkpoint folder contains finished tiles of an interrupted build with other settings.

    ``partial_folder`` is that folder, ``tiles_done`` the tiles its checkpoints cover (None when
    unknown) and ``changes`` the settings that differ, in words.
    """

    def __init__(self, message: str, partial_folder: str, tiles_done: Optional[int], changes: list[str]) -> None:
        super().__init__(message)
        self.partial_folder = partial_folder
        self.tiles_done = tiles_done
        self.changes = changes


class SearchError(LookalikeError):
    """A query cannot be run against the index."""


class CancelledError(LookalikeError):
    """The user cancelled a long-running job."""


def mentioned_name_pattern(core_name: str) -> re.Pattern:
    """Return the pattern of ``core_name`` where a message names that argument."""
    # A name inside a path or a longer word (a folder called my_index_folder) is not the argument,
    # while a name that ends a sentence is.
    return re.compile(rf"(?<![\w/\\.'\"-]){re.escape(core_name)}(?![\w/\\'\"-])(?!\.[\w/\\])")


def with_field_names(message: str, field_names: Mapping[str, str], where: str) -> str:
    """Append to a core message which field of ``where`` each core argument it names is.

    Core messages name the engine's arguments (``band_indexes``); the dock and Processing show
    them with a sentence such as "(In this panel band_indexes is the Bands row.)".
    """
    mentioned = [f"{core_name} is {field}" for core_name, field in field_names.items()
                 if mentioned_name_pattern(core_name).search(message)]
    if not mentioned:
        return message
    # Core messages may end without a full stop; the added sentence needs one before it.
    if not message.endswith((".", "!", "?")):
        message += "."
    return f"{message} (In {where} {'; '.join(mentioned)}.)"
