"""The model spec: how an ONNX encoder expects its chips, stored in the file's ``metadata_props``.

Every value in ``metadata_props`` is a JSON document, so ``"224"`` is a number, ``"\\"rgb\\""`` a
string and ``"[0.485, 0.456, 0.406]"`` a list. Lookalike writes its own keys (``LOOKALIKE_KEYS``)
and, beside them, the keys that the Deepness QGIS plugin reads: ``resolution`` in cm/px,
``tile_size`` in px, and ``standardization_mean`` and ``standardization_std``, which Deepness
applies after dividing by 255. A model made for Deepness can therefore be used here, and the other
way round.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import EncoderError

SUPPORTED_METRICS = ("cosine",)

# Keys that a model written for Lookalike must carry. gsd_m, tile_ground_size_m and
# suggestion_reason are optional because not every encoder has a natural ground size.
REQUIRED_KEYS = (
    "name",
    "version",
    "input_size_px",
    "bands",
    "value_scale",
    "mean",
    "std",
    "embedding_dim",
    "metric",
    "l2_normalized",
)
OPTIONAL_KEYS = ("gsd_m", "tile_ground_size_m", "suggestion_reason")
LOOKALIKE_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS

DEEPNESS_KEYS = ("resolution", "tile_size", "standardization_mean", "standardization_std")

# Deepness divides raw pixel values by 255 before it standardises.
DEEPNESS_VALUE_SCALE = 255.0

SPEC_FIX = (
    "store the model spec as JSON values in the ONNX metadata_props "
    "(ModelSpec.to_metadata() writes a complete set)"
)


@dataclass(frozen=True)
class ModelSpec:
    """Input contract and output properties of an ONNX image encoder.

    A chip is fed as ``(raw / value_scale - mean) / std`` per band, in the order of ``bands``, at
    ``input_size_px`` x ``input_size_px`` pixels.
    """

    name: str
    version: str
    input_size_px: int
    bands: tuple[str, ...]
    value_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedding_dim: int
    metric: str = "cosine"
    l2_normalized: bool = False
    gsd_m: Optional[float] = None
    tile_ground_size_m: Optional[float] = None
    suggestion_reason: str = ""

    def __post_init__(self) -> None:
        _check_positive_int("input_size_px", self.input_size_px)
        _check_positive_int("embedding_dim", self.embedding_dim)
        if not self.bands or len(set(self.bands)) != len(self.bands):
            raise EncoderError(
                f"Model spec key 'bands' must list each band name once, got {list(self.bands)}; "
                f"{SPEC_FIX}."
            )
        _check_positive_number("value_scale", self.value_scale)
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != len(self.bands):
                raise EncoderError(
                    f"Model spec key '{key}' has {len(values)} values but 'bands' names "
                    f"{len(self.bands)} bands {list(self.bands)}; give one value per band."
                )
        for value in self.std:
            _check_positive_number("std", value)
        if self.metric not in SUPPORTED_METRICS:
            raise EncoderError(
                f"Model spec key 'metric' is {self.metric!r}, which Lookalike does not support; "
                f"use one of {list(SUPPORTED_METRICS)}."
            )
        if self.gsd_m is not None:
            _check_positive_number("gsd_m", self.gsd_m)
        if self.tile_ground_size_m is not None:
            _check_positive_number("tile_ground_size_m", self.tile_ground_size_m)

    @property
    def band_count(self) -> int:
        return len(self.bands)

    @classmethod
    def from_metadata(
        cls,
        props: Mapping[str, str],
        *,
        input_channels: Optional[int] = None,
        input_size_px: Optional[int] = None,
        embedding_dim: Optional[int] = None,
        name: Optional[str] = None,
    ) -> ModelSpec:
        """Parse a spec from ONNX ``metadata_props`` (key to JSON text).

        A file with any Lookalike key must carry all of ``REQUIRED_KEYS``; its Deepness keys are
        then ignored. A file with only Deepness keys is read the way Deepness reads it: values
        divided by 255, mean 0 and std 1 when standardisation is absent, bands named
        ``red, green, blue`` for three channels and ``band_1 ... band_n`` otherwise. The keyword
        arguments, read from the graph by the caller, fill what Deepness keys do not carry.

        Raises:
            EncoderError: a key is missing, is not JSON or has a value of the wrong type or range.
        """
        if any(key in props for key in REQUIRED_KEYS):
            return cls._from_lookalike_keys(props)
        if any(key in props for key in DEEPNESS_KEYS):
            return cls._from_deepness_keys(
                props,
                input_channels=input_channels,
                input_size_px=input_size_px,
                embedding_dim=embedding_dim,
                name=name,
            )
        raise EncoderError(
            "The model has no spec in its ONNX metadata_props: expected the Lookalike keys "
            f"{list(REQUIRED_KEYS)} or the Deepness keys {list(DEEPNESS_KEYS)}; {SPEC_FIX}."
        )

    @classmethod
    def _from_lookalike_keys(cls, props: Mapping[str, str]) -> ModelSpec:
        missing = [key for key in REQUIRED_KEYS if key not in props]
        if missing:
            raise EncoderError(
                f"The model spec lacks the metadata_props keys {missing}; {SPEC_FIX}."
            )
        return cls(
            name=_read_str(props, "name"),
            version=_read_str(props, "version"),
            input_size_px=_read_int(props, "input_size_px"),
            bands=tuple(_read_str_list(props, "bands")),
            value_scale=_read_float(props, "value_scale"),
            mean=tuple(_read_float_list(props, "mean")),
            std=tuple(_read_float_list(props, "std")),
            embedding_dim=_read_int(props, "embedding_dim"),
            metric=_read_str(props, "metric"),
            l2_normalized=_read_bool(props, "l2_normalized"),
            gsd_m=_read_optional_float(props, "gsd_m"),
            tile_ground_size_m=_read_optional_float(props, "tile_ground_size_m"),
            suggestion_reason=_read_str(props, "suggestion_reason") if "suggestion_reason" in props else "",
        )

    @classmethod
    def _from_deepness_keys(
        cls,
        props: Mapping[str, str],
        *,
        input_channels: Optional[int],
        input_size_px: Optional[int],
        embedding_dim: Optional[int],
        name: Optional[str],
    ) -> ModelSpec:
        if "tile_size" in props:
            input_size_px = _read_int(props, "tile_size")
        if input_size_px is None:
            raise EncoderError(
                "The model has Deepness metadata without 'tile_size' and its input height and "
                "width are not fixed; add 'tile_size' (px) to the metadata_props."
            )
        if embedding_dim is None:
            raise EncoderError(
                "The model has Deepness metadata and its output size is not fixed; add "
                "'embedding_dim' to the metadata_props or export the output with a fixed size."
            )

        mean = _read_float_list(props, "standardization_mean") if "standardization_mean" in props else None
        std = _read_float_list(props, "standardization_std") if "standardization_std" in props else None
        band_count = input_channels
        for values in (mean, std):
            if values is not None and band_count is None:
                band_count = len(values)
        if band_count is None:
            raise EncoderError(
                "The model has Deepness metadata, no standardisation and no fixed channel count; "
                "add 'standardization_mean' and 'standardization_std' with one value per band."
            )
        # Deepness's defaults when a model carries no standardisation: the values stay in [0, 1].
        mean = mean if mean is not None else [0.0] * band_count
        std = std if std is not None else [1.0] * band_count

        if band_count == 3:
            bands = ("red", "green", "blue")
        else:
            bands = tuple(f"band_{index}" for index in range(1, band_count + 1))
        resolution_cm = _read_optional_float(props, "resolution")
        gsd_m = resolution_cm / 100.0 if resolution_cm is not None else None
        return cls(
            name=name or "unnamed",
            version="unknown",
            input_size_px=input_size_px,
            bands=bands,
            value_scale=DEEPNESS_VALUE_SCALE,
            mean=tuple(mean),
            std=tuple(std),
            embedding_dim=embedding_dim,
            metric="cosine",
            l2_normalized=False,
            gsd_m=gsd_m,
            tile_ground_size_m=gsd_m * input_size_px if gsd_m is not None else None,
            suggestion_reason="from Deepness 'resolution' metadata" if gsd_m is not None else "",
        )

    def to_metadata(self) -> dict[str, str]:
        """Serialise the spec to ``metadata_props`` values, Lookalike and Deepness keys together."""
        props = {
            "name": json.dumps(self.name),
            "version": json.dumps(self.version),
            "input_size_px": json.dumps(self.input_size_px),
            "bands": json.dumps(list(self.bands)),
            "value_scale": json.dumps(self.value_scale),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "embedding_dim": json.dumps(self.embedding_dim),
            "metric": json.dumps(self.metric),
            "l2_normalized": json.dumps(self.l2_normalized),
            "gsd_m": json.dumps(self.gsd_m),
            "tile_ground_size_m": json.dumps(self.tile_ground_size_m),
            "suggestion_reason": json.dumps(self.suggestion_reason),
            "tile_size": json.dumps(self.input_size_px),
        }
        # Deepness divides by 255 and then standardises, so mean and std are rescaled to give
        # the same network input for any value_scale.
        deepness_factor = self.value_scale / DEEPNESS_VALUE_SCALE
        props["standardization_mean"] = json.dumps([value * deepness_factor for value in self.mean])
        props["standardization_std"] = json.dumps([value * deepness_factor for value in self.std])
        if self.gsd_m is not None:
            props["resolution"] = json.dumps(self.gsd_m * 100.0)
        return props


def _load_json(props: Mapping[str, str], key: str) -> Any:
    text = props[key]
    try:
        return json.loads(text)
    except (TypeError, ValueError) as error:
        raise EncoderError(
            f"Model spec key '{key}' is not valid JSON ({text!r}: {error}); write each "
            "metadata_props value with json.dumps."
        ) from error


def _invalid(key: str, value: Any, expected: str) -> EncoderError:
    return EncoderError(f"Model spec key '{key}' must be {expected}, got {value!r}; {SPEC_FIX}.")


def _is_number(value: Any) -> bool:
    # bool is a subclass of int in Python, but true/false is never a meaningful size or scale.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_str(props: Mapping[str, str], key: str) -> str:
    value = _load_json(props, key)
    if not isinstance(value, str):
        raise _invalid(key, value, "a JSON string")
    return value


def _read_int(props: Mapping[str, str], key: str) -> int:
    value = _load_json(props, key)
    if not _is_number(value) or not math.isfinite(value) or float(value) != int(value):
        raise _invalid(key, value, "a JSON integer")
    return int(value)


def _read_float(props: Mapping[str, str], key: str) -> float:
    value = _load_json(props, key)
    if not _is_number(value) or not math.isfinite(value):
        raise _invalid(key, value, "a finite JSON number")
    return float(value)


def _read_optional_float(props: Mapping[str, str], key: str) -> Optional[float]:
    if key not in props or _load_json(props, key) is None:
        return None
    return _read_float(props, key)


def _read_bool(props: Mapping[str, str], key: str) -> bool:
    value = _load_json(props, key)
    if not isinstance(value, bool):
        raise _invalid(key, value, "JSON true or false")
    return value


def _read_str_list(props: Mapping[str, str], key: str) -> list[str]:
    value = _load_json(props, key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _invalid(key, value, 'a JSON list of strings such as ["red", "green", "blue"]')
    return value


def _read_float_list(props: Mapping[str, str], key: str) -> list[float]:
    value = _load_json(props, key)
    if not isinstance(value, list) or not value:
        raise _invalid(key, value, "a non-empty JSON list of numbers")
    if not all(_is_number(item) and math.isfinite(item) for item in value):
        raise _invalid(key, value, "a non-empty JSON list of finite numbers")
    return [float(item) for item in value]


def _check_positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EncoderError(f"Model spec key '{key}' must be a positive integer, got {value!r}; {SPEC_FIX}.")


def _check_positive_number(key: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise EncoderError(f"Model spec key '{key}' must be a positive number, got {value!r}; {SPEC_FIX}.")

