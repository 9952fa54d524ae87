"""Attention -> Mamba-2 conversion of Hugging Face decoders: layer choice, MaTVLM's
initialisation from Q/K/V/O, mmMamba's mimic seeding and kept attention, cached greedy
decoding against a full recompute, save / load, and the parameter arithmetic of docs/methods.md §4.4."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig,
                          PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import students
from students.hf_cache import CACHE_KWARG
from students.hybrid import (MambaAttention, MambaCacheLayer, cache_nbytes, convert, drop_attention, mamba_layers,
                             select_layers)
from students.mamba2 import Mamba2Config, Mamba2Mixer

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "phi": (PhiConfig, PhiForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}


def _model(arch="llama", layers=4, **kw):
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=50, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, **kw)
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = None  # greedy runs its full length, like the recompute
    return model


def _greedy_recompute(model, ids, steps):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def test_select_layers():
    assert select_layers("ratio:0.25", 32) == list(range(0, 32, 4))  # MaTVLM-0.25
    assert select_layers({"ratio": 0.5}, 32) == list(range(0, 32, 2))
    assert select_layers("every:4", 10) == [0, 4, 8]
    assert select_layers({"every": 3}, 7) == [0, 3, 6]
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers([3, -1, 0], 6) == [0, 3, 5]
    assert select_layers("not:every:4", 32) == [i for i in range(32) if i % 4]  # mmMamba-hybrid
    for bad in ("every:0", "ratio:1.5", "some", [7], [1, -5], [], "not:all"):
        with pytest.raises(ValueError):
            select_layers(bad, 6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi", "phi3"])
@pytest.mark.parametrize("layers", ["every:2", "all"])
def test_cached_greedy_decoding_equals_recompute(arch, layers, tmp_path):
    model = _model(arch)
    chosen = convert(model, layers, chunk_size=8)
    assert mamba_layers(model) == chosen == ([0, 2] if layers == "every:2" else [0, 1, 2, 3])
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_recompute(model, ids, 12))
    # the cache: KV entries for attention layers, a fixed-size state for Mamba layers
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    kinds = [isinstance(layer, MambaCacheLayer) for layer in cache.layers]
    assert [i for i, k in enumerate(kinds) if k] == chosen
    small = cache_nbytes(cache)
    with torch.no_grad():
        longer = model(torch.randint(0, 50, (2, 40)), use_cache=True).past_key_values
    big = cache_nbytes(longer)
    assert big["mamba"] == small["mamba"] > 0  # does not grow with the context
    assert (big["kv"] > small["kv"]) == (layers != "all")
    # save / load: the structure comes back from the config
    model.save_pretrained(tmp_path)
    again = students.load(tmp_path)
    assert mamba_layers(again) == chosen
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_prefill_and_a_decode_step_fill_the_cache_layer_by_layer(arch):
    """What each cache slot holds, read directly (not through generated tokens): a Mamba layer
    its conv window and SSM state and the tokens seen, an attention layer K/V for every token.
    The cache goes in under the installed transformers' own keyword, as `generate` passes it."""
    model = _model(arch)
    chosen = convert(model, "every:2", chunk_size=8)
    cfg = model.model.layers[0].self_attn.mamba.config
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    with torch.no_grad():
        first = model(ids, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
    for seen in (11, 12):
        assert len(cache.layers) == 4 and cache.get_seq_length() == seen
        for i, layer in enumerate(cache.layers):
            if i in chosen:
                assert isinstance(layer, MambaCacheLayer) and layer.seen == seen
                assert layer.state.conv.shape == (3, cfg.conv_dim, cfg.d_conv - 1)
                assert layer.state.ssm.shape == (3, cfg.n_heads, cfg.head_dim, cfg.d_state)
            else:
                assert not isinstance(layer, MambaCacheLayer)
                assert layer.keys.shape == layer.values.shape == (3, 2, seen, 16)  # (B, KV heads, T, head_dim)
        if seen == 11:
            with torch.no_grad():
                model(first, use_cache=True, **{CACHE_KWARG: cache})
    held = cache_nbytes(cache)
    assert held["kv"] == 2 * 2 * (3 * 2 * 12 * 16) * 4  # two attention layers, K and V, fp32
    assert held["mamba"] == 2 * 3 * (cfg.conv_dim * (cfg.d_conv - 1) + cfg.n_heads * cfg.head_dim * cfg.d_state) * 4


def test_fused_qkv_projection_is_split_into_q_k_v():
    model = _model("phi3")
    attn = model.model.layers[0].self_attn
    q, k, v = torch.split(attn.qkv_proj.weight, [64, 32, 32])
    convert(model, [0])
    mixer = model.model.layers[0].self_attn.mamba
    for part, src in (("x", v), ("B", k), ("C", q)):
        assert torch.equal(mixer.projection(part)[0], src)


def test_norms_and_mlps_are_kept_and_attention_init_copies_qkvo():
    model = _model("qwen2")  # q/k/v biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.model.layers[1].self_attn
    convert(model, [1])
    mixer = model.model.layers[1].self_attn.mamba
    for part, src in (("x", attn.v_proj), ("B", attn.k_proj), ("C", attn.q_proj)):
        w, b = mixer.projection(part)
        assert torch.equal(w, src.weight) and torch.equal(b, src.bias)
    assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
    assert not mixer.projection("z")[1].any()  # new rows' biases start at zero
    after = model.state_dict()
    for key, value in before.items():
        if "layers.1.self_attn" not in key:
            assert torch.equal(after[key], value), key
    assert not any(k.startswith("model.layers.1.self_attn.q_proj") for k in after)
    cfg = mixer.config
    assert (cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_x_heads, cfg.n_b_groups, cfg.n_c_groups) == (4, 16, 16, 2, 2, 4)


def test_a_zero_conversion_is_linear_attention_with_the_teachers_qkv():
    """The property both papers' init relies on: with A = 0, fixed dt, identity conv, no gate
    and no D, the converted layer computes causal linear attention from the attention's own
    Q, K, V (SiLU feature map, K/V repeated over the query groups)."""
    model = _model("llama").double()
    attn = model.model.layers[0].self_attn
    convert(model, [0], mimic=True, gate=False)
    mixer = model.model.layers[0].self_attn.mamba
    with torch.no_grad():
        mixer.A_log.fill_(float("-inf"))
    u = torch.randn(2, 11, 64, dtype=torch.float64)
    seen = []
    mixer.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        mixer(u)
        q = F.silu(attn.q_proj(u)).reshape(2, 11, 4, 16)
        k = F.silu(attn.k_proj(u)).reshape(2, 11, 2, 16).repeat_interleave(2, dim=2)
        v = F.silu(attn.v_proj(u)).reshape(2, 11, 2, 16).repeat_interleave(2, dim=2)
        dt = F.softplus(mixer.dt_bias)  # dt projection is zero under mimic
        scores = torch.einsum("bthn,bshn->bhts", q, k).tril()
        expected = torch.einsum("bhts,bshp->bthp", scores, v) * dt[None, None, :, None]
    torch.testing.assert_close(seen[0], expected.reshape(2, 11, 64), rtol=1e-10, atol=1e-10)


def test_mimic_seeding():
    model = _model("llama")
    convert(model, "all", mimic=True)
    m = model.model.layers[2].self_attn.mamba
    c = m.config
    assert (c.layout, c.d_conv, c.use_D, c.norm_before_gate, c.norm_group_size) == ("split", 2, False, True, 16)
    assert not m.dt_proj.weight.any()
    torch.testing.assert_close(-torch.exp(m.A_log), torch.full((4,), -torch.e))
    assert torch.equal(m.conv1d.weight[:, 0, 1], torch.ones(c.conv_dim)) and not m.conv1d.weight[:, 0, 0].any()
    bound = 2 ** -2.5 * (6 / (64 + 64)) ** 0.5  # xavier-uniform bound of the gate
    assert m.z_proj.weight.abs().max() <= bound


def test_kept_attention_passes_the_teacher_output_on(tmp_path):
    teacher = _model("llama")
    model = _model("llama")
    convert(model, "all", mimic=True, keep_attention=True)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, teacher(ids).logits)
    adapter = model.model.layers[1].self_attn
    taps = {}
    adapter.attn_out.register_forward_hook(lambda _m, _a, out: taps.update(attn=out))
    adapter.mamba.norm.register_forward_hook(lambda _m, _a, out: taps.update(mamba=out))
    with torch.no_grad():
        model(ids, use_cache=False)
    assert taps["attn"].shape == taps["mamba"].shape == (2, 10, 64)
    assert not any(p.requires_grad for p in adapter.attention.parameters())
    with pytest.raises(RuntimeError, match="keep_attention"):
        model.generate(ids, max_new_tokens=2)
    model.save_pretrained(tmp_path)
    assert hasattr(students.load(tmp_path).model.layers[0].self_attn, "attention")
    drop_attention(model)
    assert not any("attention" in n for n, _ in model.model.layers[0].self_attn.named_children())
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_recompute(model, ids, 5))


def test_random_init_differs_from_attention_init():
    a, b = _model("llama"), _model("llama")
    convert(a, [0], init="attention")
    convert(b, [0], init="random")
    wa, wb = a.model.layers[0].self_attn.mamba, b.model.layers[0].self_attn.mamba
    assert not torch.equal(wa.projection("C")[0], wb.projection("C")[0])
    assert wa.projection("z")[0].shape == wb.projection("z")[0].shape


def test_vlm_language_model_conversion_round_trip(tmp_path):
    from students.vlm import tiny_llava

    vlm = tiny_llava(vocab_size=40, image_token_id=5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     image_size=16, patch_size=8, text_layers=4).eval()
    chosen = convert(vlm, "every:2")
    assert chosen == [0, 2]
    assert isinstance(vlm.model.language_model.layers[2].self_attn, MambaAttention)
    assert not any(isinstance(m, MambaAttention) for m in vlm.model.vision_tower.modules())
    ids = torch.tensor([[1, 5, 5, 5, 5, 7, 8, 9]])
    pixels = torch.randn(1, 3, 16, 16)
    vlm.save_pretrained(tmp_path)
    again = students.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits,
                                   vlm(input_ids=ids, pixel_values=pixels).logits, atol=0, rtol=0)


def test_phi2_layer_parameter_arithmetic():
    """docs/methods.md §4.4: a Phi-2 attention (d 2560, 32 heads of 80, biases) has 26.2 M
    parameters and the Mamba-2 layer that replaces it 32.9 M (+ the z projection)."""
    d, h, hd = 2560, 32, 80
    attention = 4 * (d * d + d)
    cfg = Mamba2Config(d_model=d, n_heads=h, head_dim=hd, d_state=hd, n_x_heads=h, n_b_groups=h, n_c_groups=h,
                       norm_group_size=hd, bias=True, out_bias=True)
    with torch.device("meta"):
        n = sum(p.numel() for p in Mamba2Mixer(cfg).parameters())
    assert round(attention / 1e6, 1) == 26.2
    assert round(n / 1e6, 1) == 32.9
    d_inner, conv = h * hd, 3 * h * hd
    expected = (d + 1) * (2 * d_inner + 2 * h * hd + h) + conv * (cfg.d_conv + 1) + 3 * h + d_inner + (d_inner + 1) * d
    assert n == expected


def test_conversion_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="init"):
        convert(model, "all", init="zeros")
    with pytest.raises(ValueError, match="d_state"):
        convert(model, "all", d_state=8)
    convert(model, [0])
    with pytest.raises(ValueError, match="already"):
        convert(model, [1])
