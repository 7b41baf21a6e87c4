import torch

from amoeba_export.hf import AmoebaLlamaConfig, AmoebaLlamaForCausalLM


def make(**overrides):
    kwargs = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16, intermediate_size=32, layer_num_attention_heads=[3, 4],
                  layer_num_key_value_heads=[1, 1], layer_intermediate_sizes=[32, 16], o_proj_bias=True)
    torch.manual_seed(0)
    return AmoebaLlamaForCausalLM(AmoebaLlamaConfig(**(kwargs | overrides))).eval()


def test_per_layer_sizes_and_biases():
    m = make()
    attn0, attn1 = m.model.layers[0].self_attn, m.model.layers[1].self_attn
    assert attn0.q_proj.out_features == 48 and attn1.q_proj.out_features == 64  # 3 heads need not divide 64
    assert attn0.o_proj.bias is not None and m.model.layers[0].mlp.down_proj.bias is None
    assert m.model.layers[1].mlp.up_proj.out_features == 16


def test_kv_cache_generation_matches_full_forward():
    m = make()
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=5, do_sample=False)
        full = m(out).logits
    # Greedy decoding with the cache picks what the full forward ranks first at every step.
    assert torch.equal(full[0, 5:-1].argmax(-1), out[0, 6:])


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    m = make()
    m.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, m(ids).logits)
