import pytest

from amoeba_export.errors import ShapeError
from amoeba_export.shape import ModelDims, Shape

DIMS = ModelDims(num_layers=4, hidden_size=96, num_heads=6, num_kv_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=320, tied_embeddings=True)


def test_full_shape_params_match_model_count():
    from amoeba_export.testing import tiny_llama

    model = tiny_llama(layers=4, heads=6, kv_heads=2, hidden=96, intermediate=128, tie=True)
    assert Shape.full(DIMS).num_params(DIMS) == sum(p.numel() for p in model.parameters())


def test_json_round_trip():
    s = Shape((0, 2, 3), (6, 4, 2), (2, 2, 2), (128, 64, 32), name="x", meta={"width": 0.5})
    back = Shape.from_json(s.to_json())
    assert back == s and back.meta == {"width": 0.5}


def test_every_problem_is_reported():
    bad = Shape((3, 1, 9), (5, 6, 6), (2, 1, 2), (0, 64, 64))
    with pytest.raises(ShapeError) as err:
        bad.validate(DIMS)
    msg = str(err.value)
    for needle in ("ascending", "layer indices", "not a multiple", "every KV head", "mlp 0"):
        assert needle in msg


def test_unknown_version_rejected():
    d = Shape.full(DIMS).to_dict() | {"version": 99}
    with pytest.raises(ShapeError, match="version 99"):
        Shape.from_dict(d)
