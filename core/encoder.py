"""Image encoder: an ONNX model that maps chips to L2-normalised embeddings, run with onnxruntime.

onnxruntime is imported inside the functions that need it, so this module and the rest of the
package import on a Python without it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from . import get_logger
from .dependencies import RUNTIME_REQUIREMENTS
from .errors import EncoderError
from .spec import ModelSpec

LOGGER = get_logger("encoder")

FP32_MODEL_FILENAME = "efficientnet_lite0.onnx"
INT8_MODEL_FILENAME = "efficientnet_lite0_int8.onnx"
# The int8 copy is the default because, measured by tools/eval_encoder_aid.py on a 2-core Xeon with
# AVX-512 VNNI, it ran about 1.7x faster than fp32 and its AID precision@10 stayed within 0.01.
# On a 2-core AMD EPYC with AVX2 and no VNNI it ran at 6.0 against 6.6 ms per chip (batches of
# 32), with X64_QUANT_PRECISION_CONFIG_KEY set there. NOTE: ARM CPUs have not been measured.
DEFAULT_MODEL_FILENAME = INT8_MODEL_FILENAME
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

DEFAULT_BATCH_SIZE = 16

# onnxruntime's session option that lets idle intra-op worker threads spin instead of sleeping.
ALLOW_SPINNING_CONFIG_KEY = "session.intra_op.allow_spinning"

# onnxruntime's session option for exact int8 products. Its session options header documents that
# u8 x s8 matrix products overflow on x86 with SSE4.1, AVX2 or AVX-512 without VNNI, and that
# this option multiplies u8 x u8 there instead. On an AVX2 AMD EPYC the int8 encoder's cosine to
# the torch embeddings of tests/data/encoder_reference.npz was 0.73 to 0.96 without it and 0.95
# to 0.99 with it, at 6.0 instead of 4.2 ms per chip. On a Xeon with AVX-512 VNNI and AMX the
# option left the embeddings unchanged (largest difference 0.0) but took 9.7 instead of 3.1 ms
# per chip, so it is set only where the CPU is not known to have VNNI.
X64_QUANT_PRECISION_CONFIG_KEY = "session.x64quantprecision"

# Tried in this order; onnxruntime keeps only those that its build offers.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

# Element types onnxruntime reports for inputs that encode() can feed.
FLOAT_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

PathLike = Union[str, Path]


def default_model_path() -> Path:
    """Return the path of the default encoder bundled with the plugin, under ``models/``."""
    return MODELS_DIR / DEFAULT_MODEL_FILENAME


def fp32_model_path() -> Path:
    """Return the path of the bundled fp32 encoder, the reference the int8 default was made from."""
    return MODELS_DIR / FP32_MODEL_FILENAME


def load_encoder(path: Optional[PathLike] = None, **kwargs: Any) -> OnnxEncoder:
    """Open the encoder at ``path``, or the bundled one when ``path`` is None."""
    return OnnxEncoder(path if path is not None else default_model_path(), **kwargs)


# Operators that only quantized models contain. Their names are plain bytes in an ONNX file, so
# they are found without the onnx package, which is not a runtime dependency.
QUANTIZED_OPERATOR_NAMES = (b"QuantizeLinear", b"QLinearConv", b"ConvInteger", b"MatMulInteger")

# CPU flags of the VNNI instructions that onnxruntime's fast int8 product uses without overflow.
VNNI_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

# The same instructions as numpy names them in its CPU feature table, which numpy fills on every
# operating system. numpy has no name for AVX-VNNI, so such CPUs count as lacking VNNI there.
NUMPY_VNNI_FEATURES = ("AVX512VNNI",)


def is_quantized_model(path: PathLike) -> bool:
    """Tell whether the ONNX file at ``path`` contains quantized operators."""
    content = Path(path).read_bytes()
    return any(name in content for name in QUANTIZED_OPERATOR_NAMES)


def cpu_lacks_vnni(cpuinfo_path: PathLike = "/proc/cpuinfo", numpy_features: Optional[Mapping[str, bool]] = None
                   ) -> Optional[bool]:
    """Tell whether this x86 CPU lacks VNNI; None for other CPUs or when neither source lists its features.

    Linux's ``/proc/cpuinfo`` comes first because it names every VNNI form. Elsewhere numpy's CPU
    feature table decides (``numpy_features`` replaces it in tests).
    """
    from_cpuinfo = _cpuinfo_lacks_vnni(cpuinfo_path)
    if from_cpuinfo is not None:
        return from_cpuinfo
    features = _numpy_cpu_features() if numpy_features is None else numpy_features
    if not features.get("SSE41"):
        # Not an x86 CPU that onnxruntime's int8 kernels for x86 run on.
        return None
    return not any(features.get(name) for name in NUMPY_VNNI_FEATURES)


@functools.lru_cache(maxsize=8)
def _cpuinfo_lacks_vnni(cpuinfo_path: PathLike) -> Optional[bool]:
    # Cached because every encoder session and every build reads it, and the CPU stays the same.
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags = set(value.split())
            if "sse4_1" not in flags:
                return None
            return not (flags & VNNI_CPU_FLAGS)
    return None


def _numpy_cpu_features() -> Mapping[str, bool]:
    # A private module, which moved to another package in numpy 2. An empty table means nothing is known.
    for module_name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        features = getattr(module, "__cpu_features__", None)
        if isinstance(features, Mapping):
            return features
    return {}


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxEncoder:
    """An ONNX image encoder with its model spec, validated when it is opened.

    Attributes:
        path: the model file.
        checksum: SHA-256 hex digest of the file, stored with an index to detect a changed model.
        spec: the model spec read from the file's metadata_props.
        name: ``spec.name``.
        execution_provider: the onnxruntime execution provider that runs the model, such as
            ``CPUExecutionProvider``.
    """

    def __init__(
        self,
        path: PathLike,
        providers: Optional[Sequence[str]] = None,
        intra_op_threads: Optional[int] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        spin_between_operators: bool = True,
    ) -> None:
        """Open and validate an encoder.

        Args:
            path: the ``.onnx`` file.
            providers: onnxruntime execution providers in order of preference; by default CUDA
                where this onnxruntime build has it, then the CPU.
            intra_op_threads: threads onnxruntime uses inside one operator; None lets
                onnxruntime choose (one per physical core).
            batch_size: chips per session run in ``encode``.
            spin_between_operators: whether onnxruntime's idle worker threads keep a core busy
                while they wait for the next operator. Spinning helps when the encoder runs
                alone; a caller that does other work while the encoder runs should pass False,
                so that an idle worker leaves its core to that work.

        Raises:
            EncoderError: the file is missing, is not ONNX, needs a newer onnxruntime, has an
                input the spec cannot feed or lacks a valid spec.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path = Path(path)
        if not self.path.is_file():
            raise EncoderError(
                f"Encoder model file not found: {self.path}; choose an existing .onnx file."
            )
        self.checksum = file_sha256(self.path)
        self._session = _open_session(self.path, providers, intra_op_threads, spin_between_operators)
        self.execution_provider = self._session.get_providers()[0]

        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            names = [item.name for item in inputs]
            raise EncoderError(
                f"Encoder {self.path.name} has {len(inputs)} inputs {names}; export a model with "
                "one image input of shape (N, bands, height, width)."
            )
        self._input = inputs[0]
        self._output = outputs[0]
        _check_input_type(self.path, self._input)
        _check_input_rank(self.path, self._input)

        self.spec = ModelSpec.from_metadata(
            self._session.get_modelmeta().custom_metadata_map,
            input_channels=_static_dim(self._input.shape[1]),
            input_size_px=_static_square_size(self._input.shape),
            embedding_dim=_static_embedding_dim(self._output.shape),
            name=self.path.stem,
        )
        self.name = self.spec.name
        _check_input_matches_spec(self.path, self._input, self.spec)
        _check_output_matches_spec(self.path, self._output, self.spec)

        self._input_dtype = FLOAT_INPUT_TYPES[self._input.type]
        # A graph exported with a fixed batch size only accepts batches of exactly that size.
        self._fixed_batch_size = _static_dim(self._input.shape[0])
        self.batch_size = self._fixed_batch_size or batch_size

        gain, offset = input_gain_offset(self.spec)
        self._gain = gain[np.newaxis]
        self._offset = offset[np.newaxis]

        LOGGER.info(
            "Loaded encoder %s %s from %s (sha256 %s) on %s",
            self.spec.name,
            self.spec.version,
            self.path,
            self.checksum[:12],
            self.execution_provider,
        )

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    def encode(self, chips: np.ndarray) -> np.ndarray:
        """Embed chips given in raw pixel units.

        Args:
            chips: ``(N, bands, H, W)`` array with ``H == W == spec.input_size_px`` and values in
                ``[0, spec.value_scale]``, bands in the order of ``spec.bands``.

        Returns:
            float32 ``(N, spec.embedding_dim)``, each row of unit L2 norm, except that a row the
            model returns as all zeros stays all zeros.

        Raises:
            ValueError: ``chips`` has the wrong shape or non-finite values.
            EncoderError: the model returns an output of the wrong size or non-finite values.
        """
        self._check_chips(chips)
        return self._encode(chips, is_model_input=False)

    def encode_model_input(self, model_input: np.ndarray) -> np.ndarray:
        """Embed chips already mapped to the model's input values with :func:`input_gain_offset`.

        The build's reader thread applies that mapping to each chip while it is still in its
        CPU cache, so the encoder thread only runs the model. ``model_input`` must have the shape
        ``encode`` expects and finite values; only the shape is checked.
        """
        self._check_chips(model_input, check_values=False)
        return self._encode(model_input, is_model_input=True)

    def _encode(self, chips: np.ndarray, is_model_input: bool) -> np.ndarray:
        chip_count = chips.shape[0]
        embeddings = np.empty((chip_count, self.spec.embedding_dim), dtype=np.float32)
        for start in range(0, chip_count, self.batch_size):
            batch = chips[start : start + self.batch_size]
            embeddings[start : start + len(batch)] = self._run_batch(batch, is_model_input)
        return _l2_normalize(embeddings)

    def _check_chips(self, chips: np.ndarray, check_values: bool = True) -> None:
        size_px = self.spec.input_size_px
        expected = f"(N, {self.spec.band_count}, {size_px}, {size_px})"
        if not isinstance(chips, np.ndarray) or chips.ndim != 4:
            shape = getattr(chips, "shape", type(chips).__name__)
            raise ValueError(f"chips must be a 4-D array of shape {expected}, got shape {shape}")
        if chips.shape[1:] != (self.spec.band_count, size_px, size_px):
            raise ValueError(
                f"chips have shape {chips.shape} but encoder {self.name} expects {expected}; "
                "resample the tiles to the spec's input_size_px and select the spec's bands"
            )
        # min and max are NaN when any value is NaN and infinite when any value is, so two
        # reductions replace a full-size boolean array.
        if check_values and chips.size and not (np.isfinite(chips.min()) and np.isfinite(chips.max())):
            raise ValueError("chips contain NaN or infinite values; fill nodata before encoding")

    def _run_batch(self, batch: np.ndarray, is_model_input: bool) -> np.ndarray:
        real_count = len(batch)
        if is_model_input:
            model_input = batch
        else:
            model_input = np.multiply(batch, self._gain, dtype=np.float32)
            model_input += self._offset
        if self._fixed_batch_size and real_count < self._fixed_batch_size:
            padding = np.zeros((self._fixed_batch_size - real_count, *model_input.shape[1:]), np.float32)
            model_input = np.concatenate([model_input, padding])
        model_input = model_input.astype(self._input_dtype, copy=False)

        (output,) = self._session.run([self._output.name], {self._input.name: model_input})
        output = np.asarray(output)[:real_count].reshape(real_count, -1)
        if output.shape[1] != self.spec.embedding_dim:
            raise EncoderError(
                f"Encoder {self.name} returned {output.shape[1]} values per chip but its spec sets "
                f"embedding_dim {self.spec.embedding_dim}; correct 'embedding_dim' in the metadata."
            )
        if not np.isfinite(output).all():
            raise EncoderError(
                f"Encoder {self.name} returned NaN or infinite values; check that the model "
                "runs correctly in onnxruntime on the same input."
            )
        return output.astype(np.float32, copy=False)


def input_gain_offset(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 ``(gain, offset)``, each ``(bands, 1, 1)``, that map raw chips to model input.

    The spec's normalisation ``(raw / value_scale - mean) / std`` is ``raw * gain + offset``.
    """
    std = np.asarray(spec.std, dtype=np.float64)
    mean = np.asarray(spec.mean, dtype=np.float64)
    gain = (1.0 / (spec.value_scale * std)).astype(np.float32).reshape(-1, 1, 1)
    offset = (-mean / std).astype(np.float32).reshape(-1, 1, 1)
    return gain, offset


def _l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    # An all-zero row has no direction; it stays zero instead of becoming NaN.
    return np.divide(embeddings, norms, out=np.zeros_like(embeddings), where=norms > 0)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        try:
            spec = importlib.util.find_spec("onnxruntime")
        except (ImportError, ValueError, AttributeError):
            # Blocked in sys.modules, as a Python without it behaves.
            spec = None
        if spec is not None:
            # Installed but broken (a missing system library, a build for another Python): the
            # import error names the cause, which reinstalling the pinned version usually fixes.
            raise EncoderError(
                f"The Python package onnxruntime is installed at {spec.origin} but fails to import in "
                f"{sys.executable} ({error}); install the pinned version again, for that Python: "
                f"python -m pip install --force-reinstall '{RUNTIME_REQUIREMENTS['onnxruntime']}' "
                f"'numpy=={np.__version__}'."
            ) from error
        raise EncoderError(
            f"The Python package onnxruntime cannot be imported by {sys.executable}. In QGIS, click Install in the "
            "Lookalike message bar. Elsewhere, install it for that Python with pip, naming the numpy it has so that "
            f"pip keeps it: python -m pip install '{RUNTIME_REQUIREMENTS['onnxruntime']}' 'numpy=={np.__version__}'."
        ) from error
    return onnxruntime


def _onnxruntime_load_errors(onnxruntime: Any) -> tuple[type[BaseException], ...]:
    # onnxruntime raises its own exception classes, which derive from Exception directly.
    state = onnxruntime.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile",
             "NotImplemented", "RuntimeException", "EPFail", "NoModel")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def _open_session(
    path: Path, providers: Optional[Sequence[str]], intra_op_threads: Optional[int], spin_between_operators: bool = True
) -> Any:
    onnxruntime = _import_onnxruntime()
    available = onnxruntime.get_available_providers()
    if providers is None:
        providers = [name for name in PREFERRED_PROVIDERS if name in available]
    else:
        unknown = [name for name in providers if name not in available]
        if unknown:
            raise EncoderError(
                f"onnxruntime {onnxruntime.__version__} has no execution provider {unknown}; "
                f"choose from {available}."
            )
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
        options.intra_op_num_threads = intra_op_threads
    if not spin_between_operators:
        options.add_session_config_entry(ALLOW_SPINNING_CONFIG_KEY, "0")
    # The same embeddings on every x86 CPU matter more than speed: an index built on one machine
    # is searched with queries embedded on another. So only a CPU known to have VNNI goes without.
    if cpu_lacks_vnni() is not False:
        options.add_session_config_entry(X64_QUANT_PRECISION_CONFIG_KEY, "1")
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except _onnxruntime_load_errors(onnxruntime) as error:
        raise _translate_load_error(path, onnxruntime.__version__, error) from error


def _translate_load_error(path: Path, runtime_version: str, error: BaseException) -> EncoderError:
    message = str(error)
    lowered = message.lower()
    ir_match = re.search(r"IR version: (\d+), max supported IR version: (\d+)", message)
    if ir_match or "ir version" in lowered:
        detail = (
            f"the file has IR version {ir_match.group(1)}, this onnxruntime reads up to {ir_match.group(2)}"
            if ir_match
            else message
        )
        return EncoderError(
            f"Encoder {path.name} uses an ONNX IR version that onnxruntime {runtime_version} cannot "
            f"run ({detail}); upgrade onnxruntime or re-export the model with an older IR version."
        )
    if "opset" in lowered:
        declared = re.search(r"[Oo]pset (\d+) is under development", message)
        supported = re.search(r"till opset (\d+)", message)
        detail = (
            f"the file declares opset {declared.group(1)}, this onnxruntime supports up to {supported.group(1)}"
            if declared and supported
            else message
        )
        return EncoderError(
            f"Encoder {path.name} uses an ONNX opset that onnxruntime {runtime_version} cannot run "
            f"({detail}); upgrade onnxruntime or re-export the model with an older opset."
        )
    if "protobuf parsing failed" in lowered or "no graph was found" in lowered:
        return EncoderError(
            f"{path} is not an ONNX model (onnxruntime could not parse it); choose an .onnx "
            "file exported from a deep-learning framework."
        )
    return EncoderError(
        f"onnxruntime {runtime_version} failed to load encoder {path.name}: {message}; check "
        "the file with onnx.checker.check_model or re-export it."
    )


def _static_dim(dim: Any) -> Optional[int]:
    # onnxruntime reports a symbolic dimension as a string (its name) or None.
    return dim if isinstance(dim, int) and dim > 0 else None


def _static_square_size(shape: Sequence[Any]) -> Optional[int]:
    height, width = _static_dim(shape[2]), _static_dim(shape[3])
    return height if height is not None and height == width else None


def _static_embedding_dim(shape: Sequence[Any]) -> Optional[int]:
    trailing = [_static_dim(dim) for dim in shape[1:]]
    if not trailing or None in trailing:
        return None
    return int(np.prod(trailing))


def _check_input_type(path: Path, model_input: Any) -> None:
    if model_input.type in FLOAT_INPUT_TYPES:
        return
    if "int" in model_input.type:
        raise EncoderError(
            f"Encoder {path.name} takes {model_input.type} input '{model_input.name}', but "
            "Lookalike feeds standardised float chips; re-export the model with a float32 input."
        )
    raise EncoderError(
        f"Encoder {path.name} takes {model_input.type} input '{model_input.name}'; re-export the "
        "model with a float32 input."
    )


def _check_input_rank(path: Path, model_input: Any) -> None:
    if len(model_input.shape) != 4:
        raise EncoderError(
            f"Encoder {path.name} input '{model_input.name}' has shape {model_input.shape} (rank "
            f"{len(model_input.shape)}); export an image input of rank 4: (N, bands, height, width)."
        )


def _check_input_matches_spec(path: Path, model_input: Any, spec: ModelSpec) -> None:
    channels = _static_dim(model_input.shape[1])
    if channels is not None and channels != spec.band_count:
        raise EncoderError(
            f"Encoder {path.name} input has {channels} channels but its spec lists "
            f"{spec.band_count} bands {list(spec.bands)}; make 'bands', 'mean' and 'std' in the "
            "metadata name one entry per input channel."
        )
    for axis, label in ((2, "height"), (3, "width")):
        size_px = _static_dim(model_input.shape[axis])
        if size_px is not None and size_px != spec.input_size_px:
            raise EncoderError(
                f"Encoder {path.name} input {label} is fixed at {size_px} px but its spec says "
                f"input_size_px {spec.input_size_px}; set 'input_size_px' to {size_px}."
            )


def _check_output_matches_spec(path: Path, model_output: Any, spec: ModelSpec) -> None:
    if "float" not in model_output.type and "double" not in model_output.type:
        raise EncoderError(
            f"Encoder {path.name} output '{model_output.name}' is {model_output.type}; an encoder "
            "must return float embeddings."
        )
    output_dim = _static_embedding_dim(model_output.shape)
    if output_dim is not None and output_dim != spec.embedding_dim:
        raise EncoderError(
            f"Encoder {path.name} output '{model_output.name}' has shape {model_output.shape} "
            f"({output_dim} values per chip) but its spec says embedding_dim "
            f"{spec.embedding_dim}; set 'embedding_dim' to {output_dim}."
        )
