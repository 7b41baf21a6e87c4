"""Compute precision for calibration passes: names resolve, float32 is untouched, bfloat16 autocasts."""

import pytest
import torch

from amoeba_export.errors import ConfigError
from amoeba_export.precision import PRECISIONS, bfloat16_pays, compute_in, resolve


def test_explicit_precisions_resolve_to_their_dtype():
    assert resolve("float32") == torch.float32
    assert resolve("bfloat16") == torch.bfloat16
    assert resolve("auto") == (torch.bfloat16 if bfloat16_pays("cpu") else torch.float32)
    assert set(PRECISIONS) == {"auto", "float32", "bfloat16"}


def test_unknown_precision_names_the_supported_ones():
    with pytest.raises(ConfigError) as exc:
        resolve("fp8")
    assert "supported are: auto, float32, bfloat16" in str(exc.value)


def test_compute_in_float32_leaves_matmuls_alone_and_bfloat16_autocasts():
    a, b = torch.randn(4, 8), torch.randn(3, 8)
    with compute_in(torch.float32):
        assert torch.nn.functional.linear(a, b).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with compute_in(torch.bfloat16):
        assert torch.nn.functional.linear(a, b).dtype == torch.bfloat16
    assert torch.nn.functional.linear(a, b).dtype == torch.float32  # restored on exit
