"""The speed model's fit and its probe subnets (no export: these are the pure parts of calibrate.py)."""

import pytest

from amoeba_export.deploy.calibrate import Calibration, Point, fit_nonnegative, probe_shapes
from amoeba_export.shape import ModelDims, Shape

DIMS = ModelDims(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=100, tied_embeddings=True)


def test_fit_nonnegative_recovers_an_exact_model():
    # s = 1 ms + 2e-11 s/byte · W + 0.3 ms · L on points that separate W from L (as the probes do).
    ws, ls = [5e7, 9e7, 6e7, 1.2e8], [1, 8, 4, 8]
    ys = [1e-3 + 2e-11 * w + 3e-4 * n for w, n in zip(ws, ls)]
    a, b, c = fit_nonnegative([[1.0] * 4, ws, [float(n) for n in ls]], ys)
    assert a == pytest.approx(1e-3, rel=1e-6)
    assert b == pytest.approx(2e-11, rel=1e-6)
    assert c == pytest.approx(3e-4, rel=1e-6)


def test_fit_nonnegative_never_returns_a_negative_cost():
    # Time falling with layers would fit a negative per-layer term; the constrained fit drops it instead.
    ws, ls = [1e8, 2e8, 3e8], [8.0, 4.0, 1.0]
    ys = [1e-3 + 1e-11 * w - 1e-4 * n for w, n in zip(ws, ls)]
    coef = fit_nonnegative([[1.0] * 3, ws, ls], ys)
    assert min(coef) >= 0.0
    assert coef[2] == 0.0
    # …and is the best fit among those that keep every term ≥ 0: no worse than the best with c fixed at 0.
    free = fit_nonnegative([[1.0] * 3, ws], ys)
    err = sum((coef[0] + coef[1] * w + coef[2] * n - y) ** 2 for w, n, y in zip(ws, ls, ys))
    err_free = sum((free[0] + free[1] * w - y) ** 2 for w, y in zip(ws, ys))
    assert err <= err_free * (1 + 1e-9)


def test_probe_shapes_are_prefixes_of_the_widest_and_narrowest_candidates():
    full = Shape.full(DIMS, name="d6-w1")
    narrow = Shape((0, 2, 4, 5), (2, 4, 2, 2), (2, 2, 2, 2), (32, 64, 64, 32), name="d4-w0.5")
    middle = Shape((0, 1, 2, 3, 4), (4,) * 5, (2,) * 5, (96,) * 5, name="d5-w0.75")
    shapes = [middle, narrow, full]
    params = [s.num_params(DIMS) for s in shapes]
    probes = probe_shapes(shapes, params, (("widest", 1), ("widest", 8), ("narrowest", 3)))
    # "8 layers" of a 6-layer model is all of it; the narrow probe keeps its source's first layers and widths.
    assert [(p.layers, p.mlp) for p in probes] == [((0,), (128,)), (full.layers, full.mlp),
                                                    ((0, 2, 4), (32, 64, 64))]
    assert probes[2].q_heads == (2, 4, 2) and all(not p.problems(DIMS) for p in probes)
    assert probes[0].name == "probe-1of-d6-w1"
    # A probe that repeats another is measured once.
    assert len(probe_shapes(shapes, params, (("widest", 6), ("widest", 9)))) == 1


def test_calibration_predicts_with_layers_and_round_trips():
    cal = Calibration(backend="executorch", quant="8da4w", threads=2,
                      points=(Point("p", 1, 100, 120, 50.0, 1e8, 1000),), size=(1e5, 1.1), speed=(1e-3, 1e-11, 2e-4),
                      memory=(5e7, 1.0), machine="m", seconds=1.0)
    assert cal.predict_tok_s(10**8, 5) == pytest.approx(1 / (1e-3 + 1e-3 + 1e-3))
    assert Calibration.from_dict(cal.to_dict()) == cal
    # 1e-11 s/byte is 10 ms per GB streamed (an earlier describe() printed seconds per GB as "ms/GB").
    assert "a = 1 ms, b = 10 ms/GB, c = 0.2 ms per layer" in cal.describe()
