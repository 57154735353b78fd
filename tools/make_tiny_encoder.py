"""Build the tiny ONNX encoder used by the unit tests, and the broken variants the tests reject.

    .venv/bin/python tools/make_tiny_encoder.py [--output tests/data/tiny_encoder.onnx]

The graph is Conv(3->8, 3x3, stride 2) -> Relu -> Conv(8->16, 3x3, stride 2) -> Relu ->
GlobalAveragePool -> Flatten, so it maps (N, 3, 32, 32) float chips to (N, 16) embeddings. Weights
come from a fixed seed, so the file is the same on every run. It is built with the onnx helper API
alone; torch is not needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devimport import REPO_ROOT, import_lookalike

import_lookalike()
from lookalike.core.spec import ModelSpec  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "tiny_encoder.onnx"

TINY_INPUT_SIZE_PX = 32
TINY_EMBEDDING_DIM = 16
TINY_HIDDEN_CHANNELS = 8
# Opset 17 with IR version 8 loads in onnxruntime 1.13 and later.
TINY_OPSET = 17
TINY_IR_VERSION = 8

TINY_SPEC = ModelSpec(
    name="tiny_test_encoder",
    version="1",
    input_size_px=TINY_INPUT_SIZE_PX,
    bands=("red", "green", "blue"),
    value_scale=255.0,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    embedding_dim=TINY_EMBEDDING_DIM,
    metric="cosine",
    l2_normalized=False,
    gsd_m=None,
    tile_ground_size_m=None,
    suggestion_reason="",
)

Dim = Union[int, str]


def build_tiny_encoder(
    *,
    input_shape: Sequence[Dim] = ("batch", 3, TINY_INPUT_SIZE_PX, TINY_INPUT_SIZE_PX),
    input_type: int = TensorProto.FLOAT,
    metadata: Optional[dict[str, str]] = None,
    opset: int = TINY_OPSET,
    ir_version: int = TINY_IR_VERSION,
    weight_scale: float = 1.0,
    seed: int = 0,
) -> onnx.ModelProto:
    """Build the tiny encoder, or a variant of it for a test.

    Args:
        input_shape: the declared input shape; its channel entry, when an int, also sets the
            first convolution's input channels. Rank other than 4 produces a graph that flattens
            the input, so only the declared shape is odd.
        input_type: the input element type; an integer type gets a Cast to float inside.
        metadata: metadata_props to store; None stores ``TINY_SPEC.to_metadata()``.
        opset: the default-domain opset to declare.
        ir_version: the IR version to stamp on the file.
        weight_scale: multiplies every weight, so 0 gives a model whose output is all zeros.
        seed: seed of the weight generator.
    """
    rng = np.random.default_rng(seed)
    channels = input_shape[1] if len(input_shape) > 1 and isinstance(input_shape[1], int) else 3
    conv1_weight = rng.normal(0.0, 0.3, (TINY_HIDDEN_CHANNELS, channels, 3, 3)) * weight_scale
    conv1_bias = rng.normal(0.0, 0.1, TINY_HIDDEN_CHANNELS) * weight_scale
    conv2_weight = rng.normal(0.0, 0.3, (TINY_EMBEDDING_DIM, TINY_HIDDEN_CHANNELS, 3, 3)) * weight_scale
    conv2_bias = rng.normal(0.0, 0.1, TINY_EMBEDDING_DIM) * weight_scale
    initializers = [
        numpy_helper.from_array(conv1_weight.astype(np.float32), "conv1_weight"),
        numpy_helper.from_array(conv1_bias.astype(np.float32), "conv1_bias"),
        numpy_helper.from_array(conv2_weight.astype(np.float32), "conv2_weight"),
        numpy_helper.from_array(conv2_bias.astype(np.float32), "conv2_bias"),
    ]

    nodes = []
    image = "chips"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["chips"], ["chips_float"], to=TensorProto.FLOAT))
        image = "chips_float"
    if len(input_shape) != 4:
        # A rank-4 view keeps the graph valid, so the encoder's own check (not onnxruntime) rejects
        # the odd rank.
        shape_4d = numpy_helper.from_array(
            np.array([-1, channels, TINY_INPUT_SIZE_PX, TINY_INPUT_SIZE_PX], np.int64), "shape_4d"
        )
        initializers.append(shape_4d)
        nodes.append(helper.make_node("Reshape", [image, "shape_4d"], ["chips_4d"]))
        image = "chips_4d"
    nodes += [
        helper.make_node(
            "Conv", [image, "conv1_weight", "conv1_bias"], ["conv1"], kernel_shape=[3, 3], strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node(
            "Conv", ["relu1", "conv2_weight", "conv2_bias"], ["conv2"], kernel_shape=[3, 3], strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        inputs=[helper.make_tensor_value_info("chips", input_type, list(input_shape))],
        outputs=[
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", TINY_EMBEDDING_DIM])
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    model.producer_name = "lookalike tools/make_tiny_encoder.py"
    props = TINY_SPEC.to_metadata() if metadata is None else metadata
    helper.set_model_props(model, props)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the .onnx file")
    args = parser.parse_args(argv)

    model = build_tiny_encoder()
    onnx.checker.check_model(model, full_check=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
