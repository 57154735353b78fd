"""Make an int8 copy of the bundled encoder with onnxruntime's static quantization.

    .venv/bin/python tools/quantize_encoder.py [--output models/efficientnet_lite0_int8.onnx]

Activation ranges are calibrated on real chips from permissively licensed imagery (the GeoTIFF
crops and EuroSAT thumbnails listed in tools/export_encoder.py), never on the AID chips that the
quality figure is measured on. Weights are quantized per output channel, because depthwise
convolutions have channels whose ranges differ by orders of magnitude and one scale per tensor
flattens the small ones to zero. The model spec is copied from the fp32 file with the name
changed, so the int8 file is a complete encoder on its own.

Runs in .venv (onnx and onnxruntime come from requirements-dev.txt) or in .venv-export; torch is
not needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devimport import REPO_ROOT, import_lookalike

import_lookalike()
from export_encoder import SHARED_DATA, read_permissive_chips, standardize  # noqa: E402

from lookalike.core.spec import ModelSpec  # noqa: E402

DEFAULT_INPUT = REPO_ROOT / "models" / "efficientnet_lite0.onnx"
DEFAULT_OUTPUT = REPO_ROOT / "models" / "efficientnet_lite0_int8.onnx"
# One chip per batch: the histogram calibrators (Entropy, Percentile) fail on batches of unequal size.
CALIBRATION_BATCH_SIZE = 1


def make_reader(input_name: str, chips: np.ndarray) -> Any:
    """Return a CalibrationDataReader that feeds standardised ``chips`` in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class ChipReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(range(0, len(chips), CALIBRATION_BATCH_SIZE))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            start = next(self._batches, None)
            if start is None:
                return None
            return {input_name: standardize(chips[start : start + CALIBRATION_BATCH_SIZE])}

    return ChipReader()


def quantize(input_path: Path, output_path: Path, chips: np.ndarray, calibrate_method: str) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_model = onnx.load(str(input_path))
    props = {entry.key: entry.value for entry in fp32_model.metadata_props}
    spec = ModelSpec.from_metadata(props)
    input_name = fp32_model.graph.input[0].name

    with tempfile.TemporaryDirectory() as folder:
        # quant_pre_process runs shape inference and onnxruntime's graph optimisation first, so
        # the quantizer works on fused nodes with known shapes.
        prepared_path = Path(folder) / "prepared.onnx"
        quant_pre_process(str(input_path), str(prepared_path))
        quantize_static(
            str(prepared_path),
            str(output_path),
            make_reader(input_name, chips),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=getattr(CalibrationMethod, calibrate_method),
        )

    int8_model = onnx.load(str(output_path))
    props["name"] = json.dumps(f"{spec.name}_int8")
    del int8_model.metadata_props[:]
    onnx.helper.set_model_props(int8_model, props)
    int8_model.doc_string = fp32_model.doc_string + " Quantized to int8 by tools/quantize_encoder.py."
    onnx.checker.check_model(int8_model)
    onnx.save(int8_model, str(output_path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="the fp32 encoder")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the int8 encoder")
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="the shared real-imagery folder")
    parser.add_argument(
        "--calibrate-method",
        choices=("MinMax", "Entropy", "Percentile"),
        default="MinMax",
        help="how activation ranges are chosen from the calibration chips",
    )
    args = parser.parse_args(argv)

    chips, _chip_ids = read_permissive_chips(args.shared_data)
    quantize(args.input, args.output, chips, args.calibrate_method)
    print(
        f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), calibrated on "
        f"{len(chips)} chips with {args.calibrate_method}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
