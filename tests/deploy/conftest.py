import pytest
import torch


@pytest.fixture(scope="session")
def deploy_plan_dir(tmp_path_factory):
    """A tiny Llama (untied, 6 layers, MLP 256) and its plan; MLP widths are multiples of 32."""
    from amoeba_export.plan import PlanConfig, build_plan
    from amoeba_export.testing import tiny_llama

    root = tmp_path_factory.mktemp("deploy")
    tiny_llama(root / "model", layers=6, heads=6, kv_heads=2, hidden=96, intermediate=256)
    calib = torch.randint(0, 320, (1024,), generator=torch.Generator().manual_seed(0))
    plan = build_plan(root / "model", PlanConfig(seq_len=64, width_tokens=512, depth_tokens=256, round_to=32),
                      progress=False, calibration=calib)
    return plan.save(root / "plan")


@pytest.fixture(scope="session")
def tiny_profile():
    from amoeba_export.targets import parse_profile

    def make(**budgets):
        return parse_profile({"name": "tiny-box", "backend": "gguf", "quant": "Q8_0", "threads": 1,
                              "context_length": 128, "budgets": budgets, "search": {"max_candidates": 8}})
    return make


@pytest.fixture(scope="session")
def fast_options():
    from amoeba_export.deploy import DeployOptions

    return DeployOptions(eval_tokens=256, seq_len=64, validate_tokens=256, bench_repeats=1,
                         calibration_repeats=1, progress=False)
