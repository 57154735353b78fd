"""The bundled encoders against embeddings that torch computed for the same real chips.

tests/data/encoder_reference.npz is written by tools/export_encoder.py: six RGB chips (uint8,
224 x 224) cropped from CC0, BSD-3 and MIT licensed rasters, and the L2-normalised embeddings that
the PyTorch EfficientNet-Lite0 returned for them. CI has no torch, so this table is the only link
between the committed ONNX files and the original network.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lookalike.core.encoder import OnnxEncoder, default_model_path, fp32_model_path, load_encoder

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "encoder_reference.npz"

# Measured when exporting: 5.7e-07 on these chips (onnxruntime 1.32.0, x86-64 with AVX-512). The
# bound leaves room for other CPUs' kernels and still catches a wrong standardisation: ImageNet
# mean and std in place of 127/255 and 128/255 move single values by up to 0.32 on these chips.
FP32_MAX_ABS_DIFFERENCE = 1e-4
# int8 keeps the direction of each embedding only approximately: measured per-chip cosine
# similarity to torch is 0.949 to 0.993 on these chips.
INT8_MIN_COSINE = 0.90
INT8_MIN_MEAN_COSINE = 0.97


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as table:
        return {key: table[key] for key in table.files}


def test_reference_table_shape(reference):
    assert reference["chips"].dtype == np.uint8
    assert reference["chips"].shape == (6, 3, 224, 224)
    assert reference["embeddings"].shape == (6, 1280)
    assert len(reference["chip_ids"]) == 6


def test_fp32_matches_torch(reference):
    encoder = OnnxEncoder(fp32_model_path())
    embeddings = encoder.encode(reference["chips"].astype(np.float32))
    difference = np.abs(embeddings - reference["embeddings"]).max()
    assert difference < FP32_MAX_ABS_DIFFERENCE, f"max abs difference {difference:.2e}"


def test_int8_close_to_torch(reference):
    encoder = OnnxEncoder(fp32_model_path().with_name("efficientnet_lite0_int8.onnx"))
    embeddings = encoder.encode(reference["chips"].astype(np.float32))
    cosine = np.sum(embeddings * reference["embeddings"], axis=1)
    assert cosine.min() > INT8_MIN_COSINE, f"per-chip cosine {cosine}"
    assert cosine.mean() > INT8_MIN_MEAN_COSINE, f"per-chip cosine {cosine}"


def test_chips_differ_from_each_other(reference):
    """Guards the parity test against a table of near-identical chips that any model would pass."""
    embeddings = reference["embeddings"]
    similarity = embeddings @ embeddings.T
    off_diagonal = similarity[~np.eye(len(embeddings), dtype=bool)]
    assert off_diagonal.max() < 0.95


def test_default_model_loads():
    encoder = load_encoder()
    assert encoder.path == default_model_path()
    assert encoder.execution_provider == "CPUExecutionProvider"
    assert encoder.spec.input_size_px == 224
    assert encoder.spec.embedding_dim == 1280
    assert encoder.spec.bands == ("red", "green", "blue")
    assert encoder.spec.l2_normalized is True
    assert len(encoder.checksum) == 64


@pytest.mark.parametrize("path", [fp32_model_path(), fp32_model_path().with_name("efficientnet_lite0_int8.onnx")])
def test_bundled_metadata_for_deepness(path):
    props = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(props["tile_size"]) == 224
    assert json.loads(props["resolution"]) == pytest.approx(50.0)
    assert json.loads(props["standardization_mean"]) == pytest.approx([127.0 / 255.0] * 3)
    assert json.loads(props["standardization_std"]) == pytest.approx([128.0 / 255.0] * 3)


def test_bundled_models_under_size_limit():
    assert fp32_model_path().stat().st_size < 16e6
    assert fp32_model_path().with_name("efficientnet_lite0_int8.onnx").stat().st_size < 6e6
