import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (GQA: 6 query heads over 2 KV heads, 6 layers) saved with a tokenizer."""
    from amoeba_export.testing import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(path, layers=6, heads=6, kv_heads=2, hidden=96, intermediate=128)
    return path


@pytest.fixture(scope="session")
def tiny_calibration():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 320, (1024,), generator=g)


@pytest.fixture(scope="session")
def tiny_plan_dir(tiny_dir, tiny_calibration, tmp_path_factory):
    from amoeba_export.plan import PlanConfig, build_plan

    plan = build_plan(tiny_dir, PlanConfig(seq_len=64, width_tokens=512, depth_tokens=256, round_to=8),
                      progress=False, calibration=tiny_calibration)
    return plan.save(tmp_path_factory.mktemp("plan") / "plan")


@pytest.fixture(scope="session")
def default_model_dir():
    from amoeba_export.resources import default_model_dir

    return default_model_dir()
