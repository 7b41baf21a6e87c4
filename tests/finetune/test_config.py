import pytest

from amoeba_export.errors import ConfigError
from amoeba_export.finetune.config import SMoLConfig, TrainConfig, resume_problems


def test_all_problems_are_reported_at_once():
    bad = TrainConfig(steps=0, lr=-1, shapes_per_step=1, mixed_precision="fp8",
                      smol=SMoLConfig(experts=2, top_k=3, targets=("lm_head",)))
    with pytest.raises(ConfigError) as info:
        bad.validate()
    text = str(info.value)
    for field in ("steps", "lr", "shapes_per_step", "mixed_precision", "smol.top_k", "smol.targets"):
        assert field in text
    assert len(info.value.problems) == 6


def test_json_round_trip_and_unknown_fields():
    cfg = TrainConfig(steps=7, data_files=("a.txt",), smol=SMoLConfig(experts=1, rank=2))
    assert TrainConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="unknown field smol.bogus"):
        TrainConfig.from_dict({"smol": {"bogus": 1}})


def test_resume_compatibility():
    a = TrainConfig(steps=10)
    assert resume_problems(a, a.with_overrides(steps=20, save_every=5)) == []
    assert resume_problems(a, a.with_overrides(smol_rank=4))
    assert resume_problems(a.with_overrides(scheduler="cosine"), a.with_overrides(scheduler="cosine", steps=20))


def test_single_expert_override_routes_to_it():
    from amoeba_export.finetune.config import TrainConfig

    single = TrainConfig().with_overrides(smol_experts=1).validate()
    assert (single.smol.experts, single.smol.top_k) == (1, 1)
    assert TrainConfig().with_overrides(smol_experts=3).smol.top_k == TrainConfig().smol.top_k
