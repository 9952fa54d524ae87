"""The Scalable MatMul-free LM (Zhu et al. 2024; the `hgrn_bit` model of ridgerchu/matmulfreellm)
as a Hugging Face model built from our `BitLinear` (METHODS-COMPRESSION §5-§6).

Block: x <- x + MLGRU(RMSNorm(x)); x <- x + GLU(RMSNorm(x)); then a final RMSNorm and the LM
head. Every dense projection is a `BitLinear` (an RMSNorm inside, eps 1e-8; int8 per-token
activations; absmean ternary weights, straight-through), the LM head too (`quantize_lm_head`);
the embeddings stay full precision. Module names follow matmulfreellm's (`embeddings`,
`lower_bounds`, `layers.i.attn` / `attn_norm` / `mlp` / `mlp_norm`, `norm`, `lm_head`).

MLGRU token mixer (matmulfreellm `HGRNBitAttention`: fused_recurrent, one head, no short conv):
f = sigmoid(BitLinear_f(x)), raised to f <- lb_l + (1 - lb_l) f in every layer but the first;
c = SiLU(BitLinear_i(x)) (1 - f); h_t = f_t h_{t-1} + c_t (`kernels.hgrn`, element-wise);
o = BitLinear_o(RMSNorm(BitLinear_g(x)) * swish(h)). The forget lower bounds come from one
(L, d) parameter, zero at init: lb = cumsum(softmax over layers) - softmax[0], so lb_0 = 0 and
lb grows with depth (HGRN). GLU: BitLinear d -> 2I split into (g, u), SiLU(g) u, BitLinear I -> d,
I = 256 ceil((8d/3) / 256).

Code, not paper (METHODS-COMPRESSION §6.2): no biases; the output gate is RMSNorm(g) * swish(h)
(the paper's sigmoid(g) * h is `paper_gate=True`); the per-layer lower bounds; block pre-norms
*and* the norms inside BitLinear. Ours beyond the code: at masked (padding) positions c = 0 *and*
f = 1, so a masked token leaves the state exactly as it was anywhere in the sequence (the code
zeroes c only - the same for left padding from a zero state); o_proj is scaled by 1/sqrt(2L) at
init like down_proj (the code's scaling reaches o_proj only where Hugging Face's init runs).

Decoding keeps each layer's (B, d) state in an `MMFreeCacheLayer` at its index of any
`transformers` DynamicCache. Importing this module registers "mmfree" with AutoConfig,
AutoModel (`MMFreeModel`, so a LLaVA config can hold an mmfree text config) and
AutoModelForCausalLM. The LLaVA student around it is `students.vlm.tiny_mmfree_llava`, whose
config records its ternary layers (`ternary_record`), so a reload gets its ternary LM head back. (This module imports nothing of
`students.vlm`, so the loader can import it without a cycle through vlm's lazy loader imports.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin,
                          PreTrainedConfig, PreTrainedModel)
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from kernels.hgrn import hgrn_recurrence
from students.bitlinear import BitLinear, parse_weight_scale
from students.hf_cache import CACHE_KWARG, StateCacheLayer, either_cache, output_cache, state_layer

MIXER_GAIN = 2 ** -2.5  # xavier gain of the MLGRU projections (matmulfreellm, from HGRN)


class MMFreeConfig(PreTrainedConfig):
    """A MatMul-free LM (defaults: matmulfreellm's `HGRNBitConfig`, 1.3B size).

    Fields:
        intermediate_size: GLU width; None = 256 * ceil(int(hidden_ratio * 2/3 * hidden_size) / 256).
        num_heads: heads of the MLGRU state (B, H, d/H); the recurrence and its output norm are
            element-wise over all d channels, so heads change nothing but that reshape (kept for
            parity with the public config; must divide hidden_size).
        rms_norm_eps: block pre-norms, final norm and the mixer's output norm.
        bitlinear_eps: the RMSNorm inside every BitLinear (matmulfreellm: 1e-8).
        act_bits: activation bits of the BitLinears (None: weight-only ternary).
        weight_scale: "tensor" (one absmean scale per matrix) or "group:g".
        use_lower_bound: HGRN's per-layer forget-gate lower bounds.
        quantize_lm_head: a ternary BitLinear LM head (matmulfreellm) or a full-precision Linear.
        paper_gate: the paper's output gate sigmoid(g) * h instead of RMSNorm(g) * swish(h).
    """

    model_type = "mmfree"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    intermediate_size: int | None = None
    hidden_ratio: int = 4
    num_heads: int = 1
    rms_norm_eps: float = 1e-6
    bitlinear_eps: float = 1e-8
    act_bits: int | None = 8
    weight_scale: str = "tensor"
    use_lower_bound: bool = True
    quantize_lm_head: bool = True
    paper_gate: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)
        parse_weight_scale(self.weight_scale)  # raises on a bad spec
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        super().__post_init__(**kwargs)


# the three published sizes (matmulfreellm README; vocab 32000, the other fields default)
MMFREE_SIZES: dict[str, dict[str, int]] = {
    "370m": dict(hidden_size=1024, num_hidden_layers=24),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32),
}


# --------------------------------------------------------------------------- cache


class MMFreeCacheLayer(StateCacheLayer):
    """An MLGRU layer's entry in a `transformers` cache: its (B, d) recurrent state (float32 for
    half-precision models)."""


# --------------------------------------------------------------------------- layers


def _bitlinear(in_features: int, out_features: int, config: MMFreeConfig,
               init_scheme: tuple[str, float] | None = None) -> BitLinear:
    """A BitLinear as the config asks; `init_scheme` ("xavier", gain) or ("normal", std) is
    what `MMFreePreTrainedModel._init_weights` gives its weight (default normal(0, initializer_range))."""
    layer = BitLinear(in_features, out_features, norm="inside", group=parse_weight_scale(config.weight_scale),
                      act_bits=config.act_bits, eps=config.bitlinear_eps)
    layer.init_scheme = init_scheme
    return layer


class MLGRU(nn.Module):
    """The MatMul-free linear GRU token mixer (`attn` in matmulfreellm's blocks)."""

    def __init__(self, config: MMFreeConfig):
        super().__init__()
        d = config.hidden_size
        depth = math.sqrt(2 * config.num_hidden_layers)
        self.i_proj, self.f_proj, self.g_proj = (_bitlinear(d, d, config, ("xavier", MIXER_GAIN)) for _ in range(3))
        self.paper_gate = config.paper_gate
        self.g_norm = None if config.paper_gate else nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.o_proj = _bitlinear(d, d, config, ("xavier", MIXER_GAIN / depth))

    def forward(self, x: Tensor, lower_bound: Tensor | None = None, mask: Tensor | None = None,
                state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, d), lower bound (d,) or None, mask (B, T) (1 = token, 0 = padding) or None,
        state (B, d) or None -> output (B, T, d) and the state after the last token."""
        f = torch.sigmoid(self.f_proj(x))  # (B, T, d)
        if lower_bound is not None:
            f = lower_bound + (1 - lower_bound) * f
        c = F.silu(self.i_proj(x)) * (1 - f)  # (B, T, d)
        if mask is not None:  # padding neither writes nor decays the state
            keep = mask[..., None].to(torch.bool)
            c = c.masked_fill(~keep, 0.0)
            f = f.masked_fill(~keep, 1.0)
        h, state = hgrn_recurrence(f, c, state)  # (B, T, d), (B, d)
        g = self.g_proj(x)
        gated = torch.sigmoid(g) * h if self.paper_gate else self.g_norm(g) * F.silu(h)
        return self.o_proj(gated), state


class GLU(nn.Module):
    """The channel mixer: SiLU(g) * u with [g, u] = BitLinear(x), then BitLinear down."""

    def __init__(self, config: MMFreeConfig):
        super().__init__()
        d, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = _bitlinear(d, 2 * inner, config, ("normal", config.initializer_range))
        self.down_proj = _bitlinear(inner, d, config,
                                    ("normal", config.initializer_range / math.sqrt(2 * config.num_hidden_layers)))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)


class MMFreeBlock(GradientCheckpointingLayer):
    """x <- x + MLGRU(RMSNorm(x)); x <- x + GLU(RMSNorm(x))."""

    def __init__(self, config: MMFreeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = MLGRU(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GLU(config)

    def forward(self, hidden_states: Tensor, lower_bound: Tensor | None = None, mask: Tensor | None = None,
                cache: Any = None) -> Tensor:
        entry = state_layer(cache, self.layer_idx, MMFreeCacheLayer) if cache is not None else None
        mixed, state = self.attn(self.attn_norm(hidden_states), lower_bound, mask,
                                 entry.state if entry is not None else None)
        if entry is not None:
            entry.state, entry.seen = state, entry.seen + hidden_states.shape[1]
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# --------------------------------------------------------------------------- models


class MMFreePreTrainedModel(PreTrainedModel):
    config_class = MMFreeConfig
    config: MMFreeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MMFreeBlock"]
    _is_stateful = True  # a recurrent state cannot be cropped: no assisted generation
    _can_record_outputs = {"hidden_states": MMFreeBlock}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """METHODS-COMPRESSION §6.1: the mixer's BitLinears xavier-uniform (gain 2^-2.5), the
        others normal(0, initializer_range); o_proj and down_proj scaled by 1/sqrt(2L); norms 1,
        lower bounds 0. Each BitLinear carries its scheme, so the init is the same whichever
        model (this one or a LLaVA around it) runs it and in whatever order."""
        scheme = getattr(module, "init_scheme", None) if isinstance(module, BitLinear) else None
        if scheme is not None:
            kind, scale = scheme
            if kind == "xavier":
                init.xavier_uniform_(module.weight, gain=scale)
            else:
                init.normal_(module.weight, mean=0.0, std=scale)
        elif isinstance(module, MMFreeModel) and module.lower_bounds is not None:
            init.zeros_(module.lower_bounds)
        else:
            super()._init_weights(module)


class MMFreeModel(MMFreePreTrainedModel):
    """Embeddings -> blocks -> final RMSNorm (the decoder; `AutoModel` for "mmfree")."""

    def __init__(self, config: MMFreeConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.lower_bounds = None
        if config.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, config.hidden_size))
            # one layer reads no bound (layer 0 has none): frozen, so no parameter is left without a gradient
            self.lower_bounds.requires_grad_(config.num_hidden_layers > 1)
        self.layers = nn.ModuleList(MMFreeBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings = value

    def forget_lower_bounds(self) -> Tensor | None:
        """(L, d) forget-gate lower bounds lb_l = p_1 + ... + p_l with p = softmax(lower_bounds)
        over the layers: lb_0 = 0, increasing with depth, below 1. None without `use_lower_bound`."""
        if self.lower_bounds is None:
            return None
        p = self.lower_bounds.softmax(0)  # (L, d)
        return p.cumsum(0) - p[0]

    @capture_outputs
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Any = None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, past_key_values: Any = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """Token ids (B, T) or embeddings (B, T, d) -> final hidden states (B, T, d) and the cache.

        `attention_mask` (B, past + T), 1 for tokens and 0 for padding, as `generate` passes it;
        `position_ids` are accepted and unused (no positional encoding: the recurrence is ordered).
        """
        cache = either_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        mask = padding_mask(attention_mask, hidden.shape[1])
        bounds = self.forget_lower_bounds()
        for i, layer in enumerate(self.layers):
            bound = bounds[i] if bounds is not None and i > 0 else None  # the first layer has none
            hidden = layer(hidden, bound, mask=mask, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{CACHE_KWARG: cache})


def padding_mask(attention_mask: Tensor | None, length: int) -> Tensor | None:
    """The (B, T) part of a 2-D (B, past + T) padding mask that covers the current tokens
    (no check for "all ones": that would sync the device on every forward).

    Raises:
        ValueError: a mask that is not (batch, tokens) - a recurrent model takes no 4-D mask.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"the mmfree model takes a 2-D (batch, tokens) padding mask, got shape "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask[:, -length:]


def ternary_lm_head(hidden_size: int, vocab_size: int, config: MMFreeConfig) -> BitLinear:
    """matmulfreellm's LM head: a BitLinear with its own RMSNorm (after the model's final norm)."""
    return _bitlinear(hidden_size, vocab_size, config)


class MMFreeForCausalLM(MMFreePreTrainedModel, GenerationMixin):
    """`MMFreeModel` + LM head (ternary BitLinear, or nn.Linear without `quantize_lm_head`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MMFreeConfig):
        super().__init__(config)
        self.model = MMFreeModel(config)
        self.lm_head = ternary_lm_head(config.hidden_size, config.vocab_size, config) if config.quantize_lm_head \
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model

    @can_return_tuple
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Any = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                past_key_values: Any = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """As `MMFreeModel.forward`, plus logits of the last `logits_to_keep` positions (0: all)
        and, with `labels` (B, T; -100 ignored), the shifted next-token cross-entropy."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **{CACHE_KWARG: either_cache(cache, past_key_values)}, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{CACHE_KWARG: output_cache(outputs)})


AutoConfig.register(MMFreeConfig.model_type, MMFreeConfig, exist_ok=True)
AutoModel.register(MMFreeConfig, MMFreeModel, exist_ok=True)
AutoModelForCausalLM.register(MMFreeConfig, MMFreeForCausalLM, exist_ok=True)


# --------------------------------------------------------------------------- in a VLM


def ternary_record(model: nn.Module, weight_scale: str, act_bits: int | None) -> dict[str, Any]:
    """The `students.bitlinear.CONFIG_KEY` record of a model holding an MMFree LM: every BitLinear
    (and the LM head), so `students.load` rebuilds a LLaVA's ternary head and `workbench compress`
    packs every layer."""
    layers = {n: "inside" if m.norm is not None else "none" for n, m in model.named_modules()
              if isinstance(m, BitLinear)}
    layers.setdefault("lm_head", "inside")
    return {"scopes": ["llm", "lm_head"], "skip": [], "placement": "mmfree", "weight_scale": weight_scale,
            "act_bits": act_bits, "layers": layers, "removed_norms": []}
