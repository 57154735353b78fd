"""ModelSpec: parsing metadata_props in the Lookalike and the Deepness form, and rejecting bad values."""

import dataclasses
import json

import pytest

from lookalike.core.errors import EncoderError
from lookalike.core.spec import REQUIRED_KEYS, ModelSpec


def make_spec(**overrides) -> ModelSpec:
    values = dict(
        name="test_encoder",
        version="2",
        input_size_px=64,
        bands=("red", "green", "blue", "nir"),
        value_scale=10000.0,
        mean=(0.1, 0.2, 0.3, 0.4),
        std=(0.5, 0.6, 0.7, 0.8),
        embedding_dim=128,
        metric="cosine",
        l2_normalized=True,
        gsd_m=2.5,
        tile_ground_size_m=160.0,
        suggestion_reason="fields are about this size",
    )
    values.update(overrides)
    return ModelSpec(**values)


def deepness_props(**values) -> dict:
    return {key: json.dumps(value) for key, value in values.items()}


def test_spec_round_trip_full_keys():
    spec = make_spec()
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec


def test_spec_round_trip_without_ground_size():
    spec = make_spec(gsd_m=None, tile_ground_size_m=None, suggestion_reason="")
    props = spec.to_metadata()
    assert "resolution" not in props
    assert ModelSpec.from_metadata(props) == spec


def test_spec_values_are_json():
    props = make_spec().to_metadata()
    assert json.loads(props["input_size_px"]) == 64
    assert json.loads(props["bands"]) == ["red", "green", "blue", "nir"]
    assert json.loads(props["l2_normalized"]) is True
    assert json.loads(props["metric"]) == "cosine"


def test_spec_parses_types():
    spec = ModelSpec.from_metadata(make_spec().to_metadata())
    assert isinstance(spec.bands, tuple)
    assert isinstance(spec.mean, tuple)
    assert isinstance(spec.input_size_px, int)
    assert spec.band_count == 4


def test_spec_is_frozen():
    spec = make_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.input_size_px = 32


def test_spec_writes_deepness_keys():
    props = make_spec().to_metadata()
    assert json.loads(props["tile_size"]) == 64
    assert json.loads(props["resolution"]) == pytest.approx(250.0)  # cm/px
    # Deepness divides by 255, this spec by 10000: its mean and std are rescaled by 10000 / 255.
    factor = 10000.0 / 255.0
    assert json.loads(props["standardization_mean"]) == pytest.approx([0.1 * factor, 0.2 * factor,
                                                                       0.3 * factor, 0.4 * factor])
    assert json.loads(props["standardization_std"]) == pytest.approx([0.5 * factor, 0.6 * factor,
                                                                      0.7 * factor, 0.8 * factor])


def test_deepness_keys_give_same_input():
    """The Deepness keys alone must reproduce the network input of the full spec."""
    spec = make_spec()
    props = spec.to_metadata()
    deepness_only = {key: props[key] for key in ("resolution", "tile_size", "standardization_mean",
                                                 "standardization_std")}
    parsed = ModelSpec.from_metadata(deepness_only, embedding_dim=128)
    raw_value = 4321.0
    for band in range(spec.band_count):
        expected = (raw_value / spec.value_scale - spec.mean[band]) / spec.std[band]
        actual = (raw_value / parsed.value_scale - parsed.mean[band]) / parsed.std[band]
        assert actual == pytest.approx(expected)
    assert parsed.gsd_m == pytest.approx(2.5)
    assert parsed.input_size_px == 64


def test_deepness_only_keys():
    props = deepness_props(
        resolution=30,
        tile_size=256,
        standardization_mean=[0.485, 0.456, 0.406],
        standardization_std=[0.229, 0.224, 0.225],
    )
    spec = ModelSpec.from_metadata(props, embedding_dim=512, name="deepness_model")
    assert spec.input_size_px == 256
    assert spec.gsd_m == pytest.approx(0.3)
    assert spec.tile_ground_size_m == pytest.approx(0.3 * 256)
    assert spec.value_scale == 255.0
    assert spec.bands == ("red", "green", "blue")
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.std == (0.229, 0.224, 0.225)
    assert spec.embedding_dim == 512
    assert spec.name == "deepness_model"
    assert spec.metric == "cosine"
    assert spec.l2_normalized is False


def test_deepness_without_standardization():
    spec = ModelSpec.from_metadata(deepness_props(tile_size=128), input_channels=4, embedding_dim=64)
    assert spec.bands == ("band_1", "band_2", "band_3", "band_4")
    assert spec.mean == (0.0,) * 4
    assert spec.std == (1.0,) * 4
    assert spec.gsd_m is None


def test_deepness_tile_size_from_graph():
    props = deepness_props(standardization_mean=[0.5] * 3, standardization_std=[0.2] * 3)
    spec = ModelSpec.from_metadata(props, input_size_px=96, embedding_dim=32)
    assert spec.input_size_px == 96


def test_deepness_without_size_rejected():
    props = deepness_props(standardization_mean=[0.5] * 3, standardization_std=[0.2] * 3)
    with pytest.raises(EncoderError, match="tile_size"):
        ModelSpec.from_metadata(props, embedding_dim=32)


def test_deepness_without_embedding_dim_rejected():
    with pytest.raises(EncoderError, match="embedding_dim"):
        ModelSpec.from_metadata(deepness_props(tile_size=128), input_channels=3)


def test_deepness_without_channels_rejected():
    with pytest.raises(EncoderError, match="standardization_mean"):
        ModelSpec.from_metadata(deepness_props(tile_size=128), embedding_dim=32)


def test_no_spec_rejected():
    with pytest.raises(EncoderError, match="no spec"):
        ModelSpec.from_metadata({"producer": '"someone"'})


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_named(key):
    props = make_spec().to_metadata()
    del props[key]
    with pytest.raises(EncoderError, match=key):
        ModelSpec.from_metadata(props)


BAD_VALUES = [
    ("input_size_px", "abc", "not valid JSON"),
    ("input_size_px", "1.5", "integer"),
    ("input_size_px", "true", "integer"),
    ("input_size_px", "0", "positive"),
    ("input_size_px", '"224"', "integer"),
    ("embedding_dim", "-3", "positive"),
    ("bands", '"rgb"', "list of strings"),
    ("bands", "[1, 2, 3, 4]", "list of strings"),
    ("bands", '["red", "red", "green", "blue"]', "each band name once"),
    ("bands", "[]", "each band name once"),
    ("mean", "[0.1, 0.2]", "2 values"),
    ("mean", '[0.1, 0.2, 0.3, "x"]', "finite numbers"),
    ("mean", "[0.1, 0.2, 0.3, NaN]", "finite numbers"),
    ("std", "[0.5, 0.6, 0.0, 0.8]", "positive"),
    ("std", "[0.5, 0.6, -1.0, 0.8]", "positive"),
    ("value_scale", "0", "positive"),
    ("value_scale", "Infinity", "finite"),
    ("metric", '"euclidean"', "does not support"),
    ("metric", "3", "string"),
    ("l2_normalized", '"yes"', "true or false"),
    ("l2_normalized", "1", "true or false"),
    ("gsd_m", "-0.5", "positive"),
    ("tile_ground_size_m", '"big"', "number"),
    ("name", "42", "string"),
    ("version", "{not json", "not valid JSON"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES)
def test_bad_value_rejected(key, value, message):
    props = make_spec().to_metadata()
    props[key] = value
    with pytest.raises(EncoderError) as caught:
        ModelSpec.from_metadata(props)
    assert key in str(caught.value)
    assert message in str(caught.value)


def test_null_gsd_accepted():
    props = make_spec().to_metadata()
    props["gsd_m"] = "null"
    assert ModelSpec.from_metadata(props).gsd_m is None


def test_lookalike_keys_win_over_deepness():
    props = make_spec().to_metadata()
    props["tile_size"] = "512"
    assert ModelSpec.from_metadata(props).input_size_px == 64
