"""OnnxEncoder on the tiny test model: loading, validation of broken models and encode()."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from make_tiny_encoder import TINY_SPEC, build_tiny_encoder
from onnx import TensorProto

from lookalike.core import encoder as encoder_module
from lookalike.core.encoder import (
    ALLOW_SPINNING_CONFIG_KEY,
    X64_QUANT_PRECISION_CONFIG_KEY,
    OnnxEncoder,
    cpu_lacks_vnni,
    default_model_path,
    fp32_model_path,
    input_gain_offset,
    is_quantized_model,
)
from lookalike.core.errors import EncoderError

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO_ROOT / "tests" / "data" / "tiny_encoder.onnx"
SIZE_PX = TINY_SPEC.input_size_px


def save_model(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def random_chips(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, 3, SIZE_PX, SIZE_PX)).astype(np.float32)


def test_tiny_model_matches_generator():
    """The committed file must be what tools/make_tiny_encoder.py builds today."""
    assert TINY_MODEL.read_bytes() == build_tiny_encoder().SerializeToString()


def test_encoder_loads_tiny_model():
    encoder = OnnxEncoder(TINY_MODEL)
    assert encoder.spec == TINY_SPEC
    assert encoder.name == "tiny_test_encoder"
    assert encoder.path == TINY_MODEL
    assert encoder.checksum == hashlib.sha256(TINY_MODEL.read_bytes()).hexdigest()
    assert encoder.execution_provider == "CPUExecutionProvider"
    assert encoder.embedding_dim == 16


@pytest.mark.parametrize(("lacks_vnni", "exact"), [(True, True), (None, True), (False, False)])
def test_exact_int8_products_unless_vnni(monkeypatch, lacks_vnni, exact):
    # On a Xeon with VNNI the option gave the same embeddings three times slower.
    monkeypatch.setattr(encoder_module, "cpu_lacks_vnni", lambda: lacks_vnni)
    options = OnnxEncoder(TINY_MODEL)._session.get_session_options()
    try:
        value = options.get_session_config_entry(X64_QUANT_PRECISION_CONFIG_KEY)
    except RuntimeError:  # raised for an entry never set
        value = None

    assert (value == "1") is exact


def test_encode_shape_and_norm():
    embeddings = OnnxEncoder(TINY_MODEL).encode(random_chips(5))
    assert embeddings.shape == (5, 16)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_encode_empty_batch():
    embeddings = OnnxEncoder(TINY_MODEL).encode(np.zeros((0, 3, SIZE_PX, SIZE_PX), np.float32))
    assert embeddings.shape == (0, 16)


def test_encode_standardizes_input():
    """encode() must feed (raw / value_scale - mean) / std and L2-normalise the output."""
    import onnxruntime

    chips = random_chips(4, seed=1)
    session = onnxruntime.InferenceSession(str(TINY_MODEL), providers=["CPUExecutionProvider"])
    standardized = (chips / 255.0 - 0.5) / 0.25
    (raw_output,) = session.run(None, {"chips": standardized.astype(np.float32)})
    expected = raw_output / np.linalg.norm(raw_output, axis=1, keepdims=True)
    np.testing.assert_allclose(OnnxEncoder(TINY_MODEL).encode(chips), expected, atol=1e-5)


def test_encode_batches_agree():
    chips = random_chips(7, seed=2)
    whole = OnnxEncoder(TINY_MODEL, batch_size=16).encode(chips)
    in_pairs = OnnxEncoder(TINY_MODEL, batch_size=2).encode(chips)
    np.testing.assert_allclose(in_pairs, whole, atol=1e-6)


def test_encode_accepts_uint8():
    chips = random_chips(3, seed=3).round()
    from_float = OnnxEncoder(TINY_MODEL).encode(chips)
    from_uint8 = OnnxEncoder(TINY_MODEL).encode(chips.astype(np.uint8))
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)


def test_encode_zero_output_stays_zero(tmp_path):
    path = save_model(build_tiny_encoder(weight_scale=0.0), tmp_path)
    embeddings = OnnxEncoder(path).encode(random_chips(3))
    assert not np.isnan(embeddings).any()
    assert np.all(embeddings == 0.0)


def test_fixed_batch_model_pads_last_batch(tmp_path):
    path = save_model(build_tiny_encoder(input_shape=(2, 3, SIZE_PX, SIZE_PX)), tmp_path)
    chips = random_chips(5, seed=4)
    fixed = OnnxEncoder(path)
    assert fixed.batch_size == 2
    np.testing.assert_allclose(fixed.encode(chips), OnnxEncoder(TINY_MODEL).encode(chips), atol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [(4, 3, SIZE_PX), (4, 4, SIZE_PX, SIZE_PX), (4, 3, SIZE_PX + 1, SIZE_PX), (4, 3, SIZE_PX, 16)],
)
def test_encode_rejects_wrong_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        OnnxEncoder(TINY_MODEL).encode(np.zeros(shape, np.float32))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite_values(bad_value):
    chips = random_chips(2)
    chips[1, 0, 3, 3] = bad_value
    with pytest.raises(ValueError, match="NaN or infinite"):
        OnnxEncoder(TINY_MODEL).encode(chips)


def test_encode_model_input_matches_encode():
    encoder = OnnxEncoder(TINY_MODEL)
    chips = random_chips(5, seed=3)
    gain, offset = input_gain_offset(encoder.spec)

    from_model_input = encoder.encode_model_input(chips * gain + offset)

    assert np.allclose(from_model_input, encoder.encode(chips), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        encoder.encode_model_input(chips[:, :, :-1])


def test_missing_file_rejected(tmp_path):
    with pytest.raises(EncoderError, match="not found"):
        OnnxEncoder(tmp_path / "absent.onnx")


def test_text_file_rejected(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model")
    with pytest.raises(EncoderError, match="not an ONNX model"):
        OnnxEncoder(path)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(EncoderError, match="not an ONNX model"):
        OnnxEncoder(path)


def test_model_without_spec_rejected(tmp_path):
    path = save_model(build_tiny_encoder(metadata={}), tmp_path)
    with pytest.raises(EncoderError, match="no spec"):
        OnnxEncoder(path)


def test_missing_spec_key_rejected(tmp_path):
    metadata = TINY_SPEC.to_metadata()
    del metadata["bands"]
    path = save_model(build_tiny_encoder(metadata=metadata), tmp_path)
    with pytest.raises(EncoderError, match="bands"):
        OnnxEncoder(path)


def test_malformed_spec_key_rejected(tmp_path):
    metadata = TINY_SPEC.to_metadata()
    metadata["mean"] = "[0.5, 0.5,"
    path = save_model(build_tiny_encoder(metadata=metadata), tmp_path)
    with pytest.raises(EncoderError, match="'mean' is not valid JSON"):
        OnnxEncoder(path)


def test_wrong_input_rank_rejected(tmp_path):
    path = save_model(build_tiny_encoder(input_shape=("batch", 3 * SIZE_PX * SIZE_PX)), tmp_path)
    with pytest.raises(EncoderError, match="rank 2"):
        OnnxEncoder(path)


def test_channel_count_mismatch_rejected(tmp_path):
    path = save_model(build_tiny_encoder(input_shape=("batch", 4, SIZE_PX, SIZE_PX)), tmp_path)
    with pytest.raises(EncoderError, match="4 channels but its spec lists 3 bands"):
        OnnxEncoder(path)


@pytest.mark.parametrize("input_type", [TensorProto.UINT8, TensorProto.INT64])
def test_integer_input_rejected(tmp_path, input_type):
    path = save_model(build_tiny_encoder(input_type=input_type), tmp_path)
    with pytest.raises(EncoderError, match="float32 input"):
        OnnxEncoder(path)


def test_symbolic_size_without_spec_rejected(tmp_path):
    """A Deepness-style model whose height and width are symbolic needs 'tile_size'."""
    metadata = {"standardization_mean": json.dumps([0.5] * 3), "standardization_std": json.dumps([0.25] * 3)}
    model = build_tiny_encoder(input_shape=("batch", 3, "height", "width"), metadata=metadata)
    path = save_model(model, tmp_path)
    with pytest.raises(EncoderError, match="tile_size"):
        OnnxEncoder(path)


def test_symbolic_size_from_deepness_tile_size(tmp_path):
    metadata = {
        "tile_size": json.dumps(SIZE_PX),
        "standardization_mean": json.dumps([0.5] * 3),
        "standardization_std": json.dumps([0.25] * 3),
    }
    model = build_tiny_encoder(input_shape=("batch", 3, "height", "width"), metadata=metadata)
    encoder = OnnxEncoder(save_model(model, tmp_path, "deepness_style.onnx"))
    assert encoder.spec.input_size_px == SIZE_PX
    assert encoder.spec.embedding_dim == 16
    assert encoder.name == "deepness_style"
    # Same standardisation as the tiny spec, so the same embeddings.
    chips = random_chips(3)
    np.testing.assert_allclose(encoder.encode(chips), OnnxEncoder(TINY_MODEL).encode(chips), atol=1e-6)


def test_fixed_size_mismatch_rejected(tmp_path):
    metadata = TINY_SPEC.to_metadata()
    metadata["input_size_px"] = "64"
    path = save_model(build_tiny_encoder(metadata=metadata), tmp_path)
    with pytest.raises(EncoderError, match="fixed at 32 px"):
        OnnxEncoder(path)


def test_embedding_dim_mismatch_rejected(tmp_path):
    metadata = TINY_SPEC.to_metadata()
    metadata["embedding_dim"] = "32"
    path = save_model(build_tiny_encoder(metadata=metadata), tmp_path)
    with pytest.raises(EncoderError, match="set 'embedding_dim' to 16"):
        OnnxEncoder(path)


def test_unsupported_ir_version_rejected(tmp_path):
    path = save_model(build_tiny_encoder(ir_version=99), tmp_path)
    with pytest.raises(EncoderError, match="IR version") as caught:
        OnnxEncoder(path)
    assert "upgrade onnxruntime" in str(caught.value)


def test_unsupported_opset_rejected(tmp_path):
    path = save_model(build_tiny_encoder(opset=99), tmp_path)
    with pytest.raises(EncoderError, match="opset 99") as caught:
        OnnxEncoder(path)
    assert "upgrade onnxruntime" in str(caught.value)


def test_unknown_provider_rejected():
    with pytest.raises(EncoderError, match="NoSuchExecutionProvider"):
        OnnxEncoder(TINY_MODEL, providers=["NoSuchExecutionProvider"])


def test_intra_op_threads_accepted():
    encoder = OnnxEncoder(TINY_MODEL, intra_op_threads=1)
    assert encoder.encode(random_chips(2)).shape == (2, 16)


def test_spinning_can_be_turned_off():
    chips = random_chips(3)
    spinning = OnnxEncoder(TINY_MODEL)
    sleeping = OnnxEncoder(TINY_MODEL, spin_between_operators=False)

    assert sleeping._session.get_session_options().get_session_config_entry(ALLOW_SPINNING_CONFIG_KEY) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        # Unset, which leaves onnxruntime's default: spinning.
        spinning._session.get_session_options().get_session_config_entry(ALLOW_SPINNING_CONFIG_KEY)
    np.testing.assert_array_equal(sleeping.encode(chips), spinning.encode(chips))


def test_core_imports_without_onnxruntime():
    """The core must import without onnxruntime and qgis, and name the missing package on use."""
    script = f"""
import sys
sys.modules["onnxruntime"] = None  # makes "import onnxruntime" raise ImportError
sys.path.insert(0, {str(REPO_ROOT / "tools")!r})
from devimport import import_lookalike
import_lookalike()
from lookalike.core.encoder import OnnxEncoder, input_gain_offset
from lookalike.core.errors import EncoderError
assert "qgis" not in sys.modules, "core imported qgis"
try:
    OnnxEncoder({str(TINY_MODEL)!r})
except EncoderError as error:
    assert "onnxruntime cannot be imported by" in str(error), str(error)
else:
    raise AssertionError("OnnxEncoder opened a model without onnxruntime")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_missing_onnxruntime_message(monkeypatch):
    import sys

    from lookalike.core import encoder as encoder_module

    # A None entry makes "import onnxruntime" raise ImportError, as in a Python without it.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)

    with pytest.raises(EncoderError) as raised:
        encoder_module._import_onnxruntime()

    message = str(raised.value)
    assert f"cannot be imported by {sys.executable}" in message
    assert "click Install in the Lookalike message bar" in message
    assert f"'numpy=={np.__version__}'" in message


def test_broken_onnxruntime_message(monkeypatch):
    import builtins

    from lookalike.core import encoder as encoder_module

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("libonnxruntime.so.1: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)

    with pytest.raises(EncoderError) as raised:
        encoder_module._import_onnxruntime()

    message = str(raised.value)
    assert "onnxruntime is installed at" in message
    assert "(libonnxruntime.so.1: cannot open shared object file)" in message
    assert "--force-reinstall" in message


def test_bundled_int8_model_is_quantized():
    assert is_quantized_model(default_model_path().with_name("efficientnet_lite0_int8.onnx"))


def test_fp32_model_is_not_quantized():
    assert not is_quantized_model(fp32_model_path())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse4_1 sse4_2 avx avx2", True),
        ("fpu sse4_1 avx2 avx512f avx512_vnni", False),
        ("fpu sse4_1 avx2 avx_vnni", False),
        ("fp asimd evtstrm", None),
    ],
)
def test_cpu_vnni_read_from_cpuinfo(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n", encoding="utf-8")

    assert cpu_lacks_vnni(cpuinfo, numpy_features={}) is expected


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({"SSE41": True, "AVX2": True, "AVX512VNNI": False}, True),
        ({"SSE41": True, "AVX512F": True, "AVX512VNNI": True}, False),
        ({"SSE41": False, "ASIMD": True}, None),
        ({}, None),
    ],
)
def test_cpu_vnni_from_numpy_without_cpuinfo(tmp_path, features, expected):
    assert cpu_lacks_vnni(tmp_path / "missing", numpy_features=features) is expected


def test_cpuinfo_wins_over_numpy(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse4_1 avx2 avx_vnni\n", encoding="utf-8")

    assert cpu_lacks_vnni(cpuinfo, numpy_features={"SSE41": True, "AVX512VNNI": False}) is False


def test_numpy_cpu_features_found():
    assert encoder_module._numpy_cpu_features(), "numpy's CPU feature table was not found"
