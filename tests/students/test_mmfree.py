"""The MatMul-free LM (students/mmfree.py, METHODS-COMPRESSION §6): the MLGRU against the §6.1
formulas written out token by token, forget lower bounds, cached decoding (prefill + steps,
`generate`, left padding) against a full recompute, an audit that every matrix product in the
blocks has a ternary weight, the parameter counts of the three published sizes, save / load,
the LLaVA student around it, and gradients to every parameter through the STE."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlavaConfig, LlavaForConditionalGeneration

import students
from students.bitlinear import BitLinear, pack_model
from students.hf_cache import CACHE_KWARG
from students.mmfree import (MMFREE_SIZES, GLU, MLGRU, MMFreeCacheLayer, MMFreeConfig, MMFreeForCausalLM,
                             MMFreeModel)
from students.vlm import tiny_mmfree_llava

VOCAB, PAD = 61, 0
LLAVA_ARGS = dict(vocab_size=VOCAB, image_token_id=60, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                  image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                  text_layers=2)
N_IMAGE_TOKENS = (32 // 16) ** 2


def _config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, pad_token_id=PAD)
    return MMFreeConfig(**{**base, **kw})


def _model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = MMFreeForCausalLM(_config(**kw)).to(dtype).eval()
    with torch.no_grad():  # lower bounds away from their uniform init, so every layer's differs
        model.model.lower_bounds.normal_(std=0.5)
    model.generation_config.eos_token_id = None  # greedy runs its full length, like the recompute
    return model


def _ids(batch, length, seed=1):
    return torch.randint(3, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy_recompute(model, ids, steps, **inputs):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.ones_like(seq) if "attention_mask" not in inputs else \
                torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, ids.shape[1]:])], 1)
            extra = {k: v for k, v in inputs.items() if k != "attention_mask"}
            logits = model(input_ids=seq, attention_mask=mask, use_cache=False, **extra).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


# --------------------------------------------------------------------------- the mixer, by the formulas


def _mlgru_by_hand(mixer, x, lower_bound, mask, paper_gate):
    """§6.1 token by token: f = lb + (1 - lb) sigmoid(W_f x), c = SiLU(W_i x)(1 - f), masked
    tokens leave h as it was, o = W_o(RMSNorm(W_g x) * swish(h)) (paper: sigmoid(W_g x) * h)."""
    i, f, g = mixer.i_proj(x), torch.sigmoid(mixer.f_proj(x)), mixer.g_proj(x)
    if lower_bound is not None:
        f = lower_bound + (1 - lower_bound) * f
    c = F.silu(i) * (1 - f)
    h, hs = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        step = f[:, t] * h + c[:, t]
        h = step if mask is None else torch.where(mask[:, t, None].bool(), step, h)
        hs.append(h)
    h = torch.stack(hs, 1)
    if paper_gate:
        return mixer.o_proj(torch.sigmoid(g) * h)
    norm = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + mixer.g_norm.eps) * mixer.g_norm.weight
    return mixer.o_proj(norm * h * torch.sigmoid(h))


@pytest.mark.parametrize("paper_gate", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_mlgru_is_the_formulas_of_section_6_1(paper_gate, bounded):
    torch.manual_seed(0)
    mixer = MLGRU(_config(paper_gate=paper_gate)).double()
    assert (mixer.g_norm is None) == paper_gate
    if not paper_gate:
        with torch.no_grad():
            mixer.g_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    bound = torch.rand(32, dtype=torch.float64) * 0.9 if bounded else None
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 5] = 0  # a hole: the state passes it unchanged
    out, state = mixer(x, bound, mask)
    torch.testing.assert_close(out, _mlgru_by_hand(mixer, x, bound, mask, paper_gate), rtol=1e-10, atol=1e-10)
    assert state.shape == (3, 32)


def test_glu_is_silu_gate_times_up_then_down():
    torch.manual_seed(0)
    cfg = _config()
    glu = GLU(cfg).double()
    assert cfg.intermediate_size == 256 and glu.gate_proj.out_features == 512 and glu.down_proj.in_features == 256
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    gate, up = glu.gate_proj(x).chunk(2, -1)
    torch.testing.assert_close(glu(x), glu.down_proj(F.silu(gate) * up))


def test_config_fields_and_validation():
    sizes = {name: MMFreeConfig(**kw).intermediate_size for name, kw in MMFREE_SIZES.items()}
    assert sizes == {"370m": 2816, "1.3b": 5632, "2.7b": 6912}  # 256 * ceil((8d/3) / 256)
    cfg = MMFreeConfig()
    fields = (cfg.vocab_size, cfg.rms_norm_eps, cfg.bitlinear_eps, cfg.act_bits, cfg.num_heads)
    assert fields == (32000, 1e-6, 1e-8, 8, 1)
    assert cfg.use_lower_bound and cfg.quantize_lm_head and not cfg.tie_word_embeddings and not cfg.paper_gate
    assert MMFreeConfig(hidden_size=64, intermediate_size=100).intermediate_size == 100
    with pytest.raises(ValueError, match="weight_scale"):
        MMFreeConfig(weight_scale="row")
    with pytest.raises(ValueError, match="num_heads"):
        MMFreeConfig(hidden_size=30, num_heads=4)
    assert type(AutoConfig.for_model("mmfree")) is MMFreeConfig


def test_init_follows_section_6_1():
    model = _model()
    cfg, depth = model.config, math.sqrt(2 * 3)
    mixer, glu = model.model.layers[1].attn, model.model.layers[1].mlp
    xavier = 2 ** -2.5 * math.sqrt(6 / 64) / math.sqrt(3)  # std of xavier_uniform(gain 2^-2.5), 32 x 32
    for proj, std in ((mixer.i_proj, xavier), (mixer.f_proj, xavier), (mixer.g_proj, xavier),
                      (mixer.o_proj, xavier / depth), (glu.gate_proj, cfg.initializer_range),
                      (glu.down_proj, cfg.initializer_range / depth), (model.lm_head, cfg.initializer_range)):
        assert abs(proj.weight.std().item() / std - 1) < 0.15, proj
        assert torch.equal(proj.norm.weight, torch.ones_like(proj.norm.weight))
    bound = 2 ** -2.5 * math.sqrt(6 / 64)
    assert mixer.i_proj.weight.abs().max() <= bound
    assert not MMFreeModel(_config()).lower_bounds.any()  # zero-init (the test helper perturbs them)
    assert not model.model.embeddings.weight[PAD].any()


# --------------------------------------------------------------------------- lower bounds


def test_lower_bounds_are_zero_first_and_increase_with_depth():
    torch.manual_seed(0)
    model = MMFreeModel(_config(num_hidden_layers=5))
    lb = model.forget_lower_bounds()
    torch.testing.assert_close(lb, torch.arange(5.0)[:, None].expand(5, 32) / 5)  # zero init: l / L
    with torch.no_grad():
        model.lower_bounds.normal_(std=3.0)
    lb = model.forget_lower_bounds()
    assert lb.shape == (5, 32) and not lb[0].any()
    assert (lb[1:] > lb[:-1]).all() and (lb < 1).all()
    assert MMFreeModel(_config(use_lower_bound=False)).forget_lower_bounds() is None


def test_the_first_layer_reads_no_bound_and_the_others_theirs():
    model = _model()
    seen = []  # the mixer's second positional argument is its lower bound
    for layer in model.model.layers:
        layer.attn.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    with torch.no_grad():
        model(_ids(1, 4))
    lb = model.model.forget_lower_bounds()
    assert seen[0] is None and torch.equal(seen[1], lb[1]) and torch.equal(seen[2], lb[2])


# --------------------------------------------------------------------------- decoding


def test_prefill_then_steps_equal_the_full_forward():
    model = _model(dtype=torch.float64)
    ids = _ids(4, 13)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, :8], use_cache=True, **{CACHE_KWARG: cache}).logits]
        for t in range(8, 13):
            assert cache.get_seq_length() == t
            parts.append(model(ids[:, t:t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert [type(layer) for layer in cache.layers] == [MMFreeCacheLayer] * 3
    assert all(layer.seen == 13 and layer.state.shape == (4, 32) for layer in cache.layers)
    assert cache.layers[0].nbytes() == 4 * 32 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generate_with_the_cache_equals_a_recompute(dtype):
    model = _model(dtype=dtype)
    ids = _ids(4, 7)  # (batches of 2-3 rows hit a slow path of tiny 2-thread CPU matmuls)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         use_cache=True, pad_token_id=PAD)
    assert torch.equal(out, _greedy_recompute(model, ids, 10))


def test_left_padding_changes_nothing_for_the_padded_sequence():
    model = _model(dtype=torch.float64)
    long, short = _ids(1, 9, seed=2), _ids(1, 5, seed=3)
    batch = torch.cat([long, torch.cat([torch.full((1, 4), PAD), short], 1)]).repeat(2, 1)  # 4 rows
    mask = (batch != PAD).long()
    assert mask[1, :4].eq(0).all() and mask[1, 4:].all() and mask[0].all()
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone = model(short).logits
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=1e-10, atol=1e-10)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out, _greedy_recompute(model, batch, 6, attention_mask=mask))
    out_alone = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=6, do_sample=False,
                               pad_token_id=PAD)
    assert torch.equal(out[1, 4:], out_alone[0])


def test_a_bfloat16_model_decodes_with_a_float32_state():
    model = _model(dtype=torch.bfloat16)
    ids = _ids(4, 6)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert all(layer.state.dtype == torch.float32 for layer in getattr(out, CACHE_KWARG).layers)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                               pad_token_id=PAD)
    assert generated.shape == (4, 9)


def test_a_four_dimensional_mask_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="2-D"):
        model(_ids(1, 3), attention_mask=torch.ones(1, 1, 3, 3))


# --------------------------------------------------------------------------- no floating-point matmul


MATMUL_NAMES = {"linear", "bilinear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addmv", "mv",
                "baddbmm", "addbmm", "einsum", "tensordot", "chain_matmul", "inner", "outer", "dot", "conv1d"}


class MatmulAudit(TorchFunctionMode):
    """Records every matrix-product call under it, with the innermost module running it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.calls, self.stack = [], []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: self.stack.append((_n, m))))
            self.handles.append(module.register_forward_hook(self._leave))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in MATMUL_NAMES:
            self.calls.append((func.__name__, self.stack[-1] if self.stack else ("", None), args))
        return func(*args, **(kwargs or {}))

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def is_ternary(w: torch.Tensor, group: int | None) -> bool:
    """Every entry is 0 or +-gamma of its scale group (gamma up to rounding of the STE sum): a
    fake-quantized weight {-gamma, 0, gamma}, or the codes {-1, 0, 1} of an integer path."""
    g = (w.reshape(1, -1) if group is None else w.reshape(-1, group)).detach().abs()
    top = g.amax(-1, keepdim=True)
    return bool(((g == 0) | ((g - top).abs() <= 1e-6 * top)).all()) and bool((g == 0).any())


def _tensors(args) -> list[torch.Tensor]:
    """The tensor operands of a call (einsum takes them as a list too)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def test_the_audit_catches_a_floating_point_matmul():
    layer = nn.Linear(8, 4)
    audit = MatmulAudit(layer)
    with audit:
        layer(torch.randn(2, 8))
    audit.remove()
    [(name, (_, module), args)] = audit.calls
    assert name == "linear" and module is layer and not any(is_ternary(t, None) for t in _tensors(args))


@pytest.mark.parametrize("weight_scale, group", [("tensor", None), ("group:16", 16)])
def test_every_matmul_in_the_blocks_has_a_ternary_weight(weight_scale, group):
    model = _model(weight_scale=weight_scale).model
    audit = MatmulAudit(model)
    with audit, torch.no_grad():
        model(_ids(2, 6))
    audit.remove()
    bitlinears = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(bitlinears) == 3 * 6  # i, f, g, o + gate, down per layer
    called = [name for _, (name, _), _ in audit.calls]
    assert sorted(called) == sorted(bitlinears)  # each BitLinear once, nothing else multiplies matrices
    for func, (name, module), args in audit.calls:  # F.linear with Q_w(W), or an integer path's product
        assert isinstance(module, BitLinear), (func, name)
        weights = [t for t in _tensors(args) if t.numel() == module.weight.numel()]
        assert any(is_ternary(w, group) for w in weights), f"{name}: {func} without a ternary weight operand"


# --------------------------------------------------------------------------- sizes


# [derived] METHODS-COMPRESSION §6.1 gives 373.8M / 1.364B / 2.702B. Counting the model as built
# (matmulfreellm's layout: an RMSNorm weight inside every BitLinear incl. the LM head, two block
# norms, the mixer's output norm, the final norm, the (L, d) lower bounds) gives 374.1M / 1.365B /
# 2.702B. Without the norm weights it is 373.8M / 1.364B / 2.701B: the note's first two totals
# leave the norms out, its third counts them. The ternary part (mixer + GLU weights) matches.
SIZES = {"370m": (374_108_160, 308_281_344, 266_240), "1.3b": (1_364_779_008, 1_233_125_376, 532_480),
         "2.7b": (2_702_357_504, 2_537_553_920, 881_664)}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameter_counts_of_the_published_sizes(size):
    cfg = MMFreeConfig(**MMFREE_SIZES[size])
    with torch.device("meta"):
        model = MMFreeForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    ternary = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, BitLinear))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert (total, ternary, norms) == SIZES[size]
    d, layers, inner = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    assert ternary == layers * (4 * d * d + 3 * d * inner)
    assert total == ternary + 2 * cfg.vocab_size * d + layers * d + norms  # + embeddings, head, lower bounds
    rounded = {"370m": "374.1M", "1.3b": "1.365B", "2.7b": "2.702B"}[size]  # 4 significant digits
    assert f"{total / 1e6:.4g}M" == rounded or f"{total / 1e9:.4g}B" == rounded
    matrices = ternary + 2 * cfg.vocab_size * d  # the note's first two totals: matrices only
    rounded = {"370m": "373.8M", "1.3b": "1.364B", "2.7b": "2.701B"}[size]
    assert f"{matrices / 1e6:.4g}M" == rounded or f"{matrices / 1e9:.4g}B" == rounded


# --------------------------------------------------------------------------- save / load, LLaVA


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _model(weight_scale="group:16", act_bits=None)
    model.save_pretrained(tmp_path)
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(again) is MMFreeForCausalLM and not info["missing_keys"] and not info["unexpected_keys"]
    assert again.config.weight_scale == "group:16" and again.config.act_bits is None
    assert again.model.layers[0].attn.i_proj.group == 16 and again.lm_head.act_bits is None
    ids = _ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_causal_lm_inputs_embeds_logits_to_keep_and_loss():
    model = _model()
    ids = _ids(2, 7)
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        last = model(ids, logits_to_keep=1).logits
        as_tuple = model(ids, return_dict=False)
    torch.testing.assert_close(by_embeds, out.logits)
    torch.testing.assert_close(as_tuple[0], out.logits)
    assert len(out.hidden_states) == 3 + 1  # the embeddings, then each block (the last one after the final norm)
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(ids))
    torch.testing.assert_close(last, out.logits[:, -1:])
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert isinstance(model.lm_head, BitLinear)
    assert type(_model(quantize_lm_head=False).lm_head) is nn.Linear


def _llava_inputs(batch=2, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 59, (batch, 1 + N_IMAGE_TOKENS + text), generator=g)
    ids[:, 1:1 + N_IMAGE_TOKENS] = LLAVA_ARGS["image_token_id"]
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return ids, pixels


def test_llava_with_the_mmfree_language_model(tmp_path):
    torch.manual_seed(0)
    model = tiny_mmfree_llava(**LLAVA_ARGS).eval()
    model.generation_config.eos_token_id = None
    assert isinstance(model.model.language_model, MMFreeModel) and isinstance(model.lm_head, BitLinear)
    xavier = 2 ** -2.5 * math.sqrt(6 / 64) / math.sqrt(3)  # the mixer's init holds inside LLaVA too
    mixer = model.model.language_model.layers[1].attn
    assert abs(mixer.f_proj.weight.std().item() / xavier - 1) < 0.15
    assert abs(mixer.o_proj.weight.std().item() / (xavier / 2) - 1) < 0.15  # / sqrt(2 L), L = 2
    ids, pixels = _llava_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape == (2, ids.shape[1], VOCAB) and torch.isfinite(logits).all()
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False, pad_token_id=PAD)
    assert torch.equal(out, _greedy_recompute(model, ids, 6, pixel_values=pixels))
    # saved, then `students.load`: the config records every ternary layer, the LLaVA head included
    model.save_pretrained(tmp_path / "trained")
    config = LlavaConfig.from_pretrained(tmp_path / "trained")
    assert isinstance(config.text_config, MMFreeConfig) and "lm_head" in config.workbench_ternary["layers"]
    again = students.load(tmp_path / "trained").eval()
    assert isinstance(again.lm_head, BitLinear)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits, logits, rtol=0, atol=0)
    _, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "trained", output_loading_info=True)
    assert "lm_head.norm.weight" in info["unexpected_keys"]  # what loading without the record gets wrong
    # packed: every projection and the head as 2-bit codes, the integer path - the same logits
    assert pack_model(again) == len(config.workbench_ternary["layers"]) == 2 * 6 + 1
    again.save_pretrained(tmp_path / "packed")
    packed = students.load(tmp_path / "packed").eval()
    assert not any(isinstance(m, BitLinear) for m in packed.modules())
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids, pixel_values=pixels).logits, logits)


def test_llava_keeps_a_linear_head_when_asked():
    model = tiny_mmfree_llava(**LLAVA_ARGS, quantize_lm_head=False)
    assert type(model.lm_head) is nn.Linear and not hasattr(model.config, "workbench_ternary")


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("options", [{}, {"paper_gate": True, "weight_scale": "group:16"}, {"act_bits": None}])
def test_every_parameter_gets_a_finite_gradient(options):
    model = _model(**options).train()
    ids = _ids(2, 9)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_one_layer_freezes_the_lower_bounds_it_never_reads():
    model = _model(num_hidden_layers=1).train()
    model(_ids(1, 4), labels=_ids(1, 4)).loss.backward()
    assert not model.model.lower_bounds.requires_grad and model.model.lower_bounds.grad is None


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model().train()
    ids = _ids(2, 9)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)


def test_llava_student_gets_gradients_everywhere_but_the_unused_tower_norm():
    torch.manual_seed(0)
    model = tiny_mmfree_llava(**LLAVA_ARGS).train()
    ids, pixels = _llava_inputs()
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("model.vision_tower.post_layernorm."):
            assert not p.requires_grad and p.grad is None  # frozen: LLaVA never reads it
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
