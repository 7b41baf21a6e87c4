import torch

from amoeba_export.finetune.layer import SMoLLoRA


def _adapter(experts=3, out_f=24, in_f=16, rank=4):
    gen = torch.Generator().manual_seed(0)
    ad = SMoLLoRA(in_f, out_f, experts=experts, rank=rank, scaling=2.0, generator=gen)
    with torch.no_grad():
        ad.lora_B.normal_(generator=gen)  # B starts at zero; make ΔW non-trivial
    ad.mix = torch.tensor([0.7, 0.0, 0.3])[:experts]
    return ad


def test_subnet_lora_is_the_slice_of_the_full_lora():
    ad = _adapter()
    full = ad.delta_weight(24, 16)
    for out_f, in_f in ((24, 16), (12, 16), (24, 8), (5, 3)):
        torch.testing.assert_close(ad.delta_weight(out_f, in_f), full[:out_f, :in_f], rtol=0, atol=1e-6)
        x = torch.randn(2, 5, in_f)
        torch.testing.assert_close(ad(x, out_f, in_f), x @ full[:out_f, :in_f].T, rtol=1e-5, atol=1e-5)


def test_mixed_factors_follow_the_gate():
    ad = _adapter()
    a = 0.7 * ad.lora_A[0] + 0.3 * ad.lora_A[2]
    b = 0.7 * ad.lora_B[0] + 0.3 * ad.lora_B[2]
    torch.testing.assert_close(ad.delta_weight(24, 16), b @ a * 2.0, rtol=1e-5, atol=1e-6)


def test_fresh_adapter_is_a_no_op():
    ad = SMoLLoRA(16, 8, experts=1, rank=4, scaling=4.0)
    assert torch.count_nonzero(ad.delta_weight(8, 16)) == 0
    assert torch.count_nonzero(ad.lora_A) > 0  # B = 0, A random: gradients reach B at step one
