"""Attention -> Mamba-2 conversion of Hugging Face decoders (MaTVLM, mmMamba; docs/methods.md §4-§5).

`convert(model, layers)` swaps the self-attention of the chosen decoder layers of a causal LM
or of the language model inside a VLM (Llama, Qwen2, Phi, ... - anything whose decoder layers
call `self.self_attn(hidden_states=..., cache=...)` (`past_key_values=` before transformers 5.24) and whose attention has
q/k/v projections) for a `MambaAttention`: a `Mamba2Mixer` behind the attention's call
signature. Norms, MLPs, the residual layout (Phi's parallel block included), embeddings and
head are kept, so the layer is `y = x + Mamba(LN(x)) + ...` exactly where attention was.

Initialisation from the layer's attention (`init="attention"`, MaTVLM's `init_with_kqvo`):
C <- W_Q, B <- W_K, x <- W_V, out_proj <- W_O, with heads = attention heads, head_dim =
d_state = attention head_dim, x and B keeping the teacher's KV heads (repeated like GQA) and
C all query heads. Attention biases (Qwen2's q/k/v) are copied too - MaTVLM's released
configs have none; copying keeps the A = 0 equivalence with linear attention exact. The
z (gate) rows, dt, A, D and conv keep mamba's default init.

`mimic=True` adds mmMamba's seeding: split projections (so stages can freeze the inherited
x/B/C), dt projection zero (dt = softplus(dt_bias) at first), A = -e, a kernel-2 conv that
passes the current token through, no D, per-head RMSNorm then an output gate SiLU(W_g u)
with W_g xavier-uniform (gain 2^-2.5). `keep_attention=True` keeps the original attention
inside the adapter (frozen), runs it next to the mixer and passes *its* output on, so the
layer-wise stages of mmMamba compare `self_attn.mamba.norm` (mixer output before out_proj)
with `self_attn.attn_out` (attention output before o_proj) with upstream errors cut off.

The conversion is recorded in the (text) config as `hybrid` (converted layer indices, the
mixer config, `keep_attention`), so `students.load` rebuilds the structure before loading
weights. Decoding uses any `transformers` DynamicCache: attention layers keep their KV
entries, Mamba layers put a `MambaCacheLayer` (conv + SSM state, fixed size) at their index.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from students.hf_cache import StateCacheLayer, either_cache, state_layer
from students.mamba2 import Mamba2Config, Mamba2Mixer

HYBRID_KEY = "hybrid"  # the text-config attribute that records a conversion
MIMIC_GATE_GAIN = 2 ** -2.5


# --------------------------------------------------------------------------- cache


class MambaCacheLayer(StateCacheLayer):
    """A Mamba layer's entry in a `transformers` cache: its conv and SSM state (`Mamba2State`)."""


def cache_nbytes(cache: Any) -> dict[str, int]:
    """Bytes a cache holds: attention KV entries and Mamba states, separately."""
    kv = mamba = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, MambaCacheLayer):
            mamba += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            kv += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return {"kv": kv, "mamba": mamba}


# --------------------------------------------------------------------------- the adapter


class MambaAttention(nn.Module):
    """A `Mamba2Mixer` in an attention layer's place: same call, same (output, weights) return.

    Args:
        mixer: the Mamba-2 mixer (`self.mamba`).
        layer_idx: the decoder layer's index (its cache slot).
        attention: the original attention, kept frozen for mmMamba's layer-wise stages (see
            the module docstring); its output is what the layer passes on.

    The mixer reads no attention mask: right padding (training batches) cannot reach earlier
    tokens through a causal scan, but in left-padded batched generation the pad tokens enter
    the state of the shorter prompts (as in mamba-ssm's own generation without masking).
    """

    def __init__(self, mixer: Mamba2Mixer, layer_idx: int, attention: nn.Module | None = None):
        super().__init__()
        self.mamba = mixer
        self.layer_idx = layer_idx
        if attention is not None:
            attention.requires_grad_(False)
            self.attention = attention
            self.attn_out = nn.Identity()  # tap: the attention's output before o_proj

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, cache: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[Tensor, None]:
        cache = either_cache(cache, past_key_values)
        if hasattr(self, "attention"):
            return self._alongside_attention(hidden_states, attention_mask, cache, **kwargs)
        entry = state_layer(cache, self.layer_idx, MambaCacheLayer) if cache is not None else None
        out, state = self.mamba(hidden_states, entry.state if entry is not None else None)
        if entry is not None:
            entry.state, entry.seen = state, entry.seen + hidden_states.shape[1]
        return out, None

    def _alongside_attention(self, hidden_states: Tensor, attention_mask: Tensor | None,
                             cache: Any, **kwargs: Any) -> tuple[Tensor, None]:
        entry = state_layer(cache, self.layer_idx, MambaCacheLayer) if cache is not None else None
        if entry is not None and entry.seen:
            raise RuntimeError("a model converted with keep_attention=True is for layer-wise training and cannot "
                               "decode with a cache; convert again without keep_attention to generate")
        kwargs.pop("use_cache", None)
        seen: list[Tensor] = []
        o_proj = _output_projection(self.attention)
        handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                out, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)  # no cache
        finally:
            handle.remove()
        self.attn_out(seen[0])
        self.mamba(hidden_states, pre_out=True)  # read through the `mamba.norm` tap
        if entry is not None:
            entry.seen += hidden_states.shape[1]
        return out, None


# --------------------------------------------------------------------------- conversion


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding `.layers`) of a causal LM or of a VLM's language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder with a ModuleList `layers`")
    return decoder


def select_layers(spec: Any, n_layers: int) -> list[int]:
    """Which layers to convert.

    `spec`: "all"; a list of indices (negative count from the end); "every:K" / {"every": K}
    (0, K, 2K, ...); "ratio:R" / {"ratio": R} (round(R * n) layers evenly spaced from 0 -
    MaTVLM's 25 % of 32 layers is [0, 4, ..., 28]); "not:<spec>" every layer but those
    (mmMamba-hybrid converts "not:every:4", keeping attention in layers 0, 4, ..., 28).
    """
    if isinstance(spec, dict) and len(spec) == 1:
        (key, value), = spec.items()
        spec = f"{key}:{value}"
    if isinstance(spec, str) and spec.strip().startswith("not:"):
        keep = set(select_layers(spec.strip()[4:], n_layers))
        rest = [i for i in range(n_layers) if i not in keep]
        if not rest:
            raise ValueError(f"layers {spec!r} leaves no layer to convert")
        return rest
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_layers))
        match = re.fullmatch(r"(every|ratio):([0-9.]+)", spec.strip())
        if not match:
            raise ValueError(f"layers {spec!r}: use all, every:K, ratio:R, not:<spec> or a list of indices")
        kind, value = match.groups()
        if kind == "every":
            k = int(float(value))
            if k < 1:
                raise ValueError(f"layers {spec!r}: K must be >= 1")
            return list(range(0, n_layers, k))
        r = float(value)
        if not 0 < r <= 1:
            raise ValueError(f"layers {spec!r}: R must be in (0, 1]")
        count = max(1, round(r * n_layers))
        return sorted({math.floor(i * n_layers / count) for i in range(count)})
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        out = sorted({i % n_layers for i in spec if -n_layers <= i < n_layers})
        if len(out) != len(set(spec)):
            bad = [i for i in spec if not -n_layers <= i < n_layers]
            raise ValueError(f"layers {list(spec)}: {bad[0] if bad else 'a repeated index'} is not one of the "
                             f"{n_layers} layers (or repeats one)")
        return out
    raise ValueError(f"layers {spec!r}: use all, every:K, ratio:R or a non-empty list of indices")


def _output_projection(attention: nn.Module) -> nn.Linear:
    for name in ("o_proj", "dense", "out_proj", "wo"):
        if isinstance(getattr(attention, name, None), nn.Linear):
            return getattr(attention, name)
    raise ValueError(f"{type(attention).__name__} has no output projection (o_proj / dense / out_proj / wo)")


def attention_projections(attention: nn.Module, n_heads: int, n_kv: int, head_dim: int) -> dict[str, tuple]:
    """The attention's Q, K, V, O as (weight, bias) pairs: separate q/k/v_proj, or a fused
    `qkv_proj` laid out [Q; K; V] (Phi-3). InternLM2's interleaved `wqkv` is not handled."""
    if all(isinstance(getattr(attention, f"{p}_proj", None), nn.Linear) for p in "qkv"):
        qkv = {p: (getattr(attention, f"{p}_proj").weight, getattr(attention, f"{p}_proj").bias) for p in "qkv"}
    elif isinstance(getattr(attention, "qkv_proj", None), nn.Linear):
        w, b = attention.qkv_proj.weight, attention.qkv_proj.bias
        sizes = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
        ws = torch.split(w, sizes)
        bs = torch.split(b, sizes) if b is not None else (None,) * 3
        qkv = dict(zip("qkv", zip(ws, bs)))
    else:
        raise ValueError(f"{type(attention).__name__}: cannot find q/k/v projections (q_proj, k_proj, v_proj or "
                         "qkv_proj) to initialise the Mamba layer from")
    o = _output_projection(attention)
    return {**qkv, "o": (o.weight, o.bias)}


def _attention_shape(config: Any) -> tuple[int, int, int, int]:
    d = config.hidden_size
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    hd = getattr(config, "head_dim", None) or d // h
    return d, h, kv, hd


def mixer_config(text_config: Any, mimic: bool = False, has_bias: bool = False, out_bias: bool = False,
                 **overrides: Any) -> Mamba2Config:
    """The mixer that fits a decoder's attention: heads, head_dim = d_state and KV grouping
    from the attention; MaTVLM's mamba defaults or, with `mimic`, mmMamba's."""
    d, h, kv, hd = _attention_shape(text_config)
    base: dict[str, Any] = dict(d_model=d, n_heads=h, head_dim=hd, d_state=hd, n_x_heads=kv, n_b_groups=kv,
                                n_c_groups=h, norm_group_size=hd, bias=has_bias, out_bias=out_bias)
    if mimic:
        base.update(layout="split", d_conv=2, use_D=False, norm_before_gate=True, chunk_size=128)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Mamba2Config(**base)


@torch.no_grad()
def init_from_attention(mixer: Mamba2Mixer, attention: nn.Module) -> None:
    """MaTVLM's init: C <- W_Q, B <- W_K, x <- W_V, out_proj <- W_O (biases too; the z and dt
    rows' biases zero)."""
    c = mixer.config
    proj = attention_projections(attention, c.n_heads, c.n_x_heads, c.head_dim)
    for part, key in (("x", "v"), ("B", "k"), ("C", "q")):
        weight, bias = mixer.projection(part)
        w_src, b_src = proj[key]
        if weight.shape != w_src.shape:
            raise ValueError(f"mixer {part} rows {tuple(weight.shape)} do not fit the attention's "
                             f"{key}_proj {tuple(w_src.shape)}")
        weight.copy_(w_src)
        if bias is not None:
            bias.copy_(b_src if b_src is not None else torch.zeros_like(bias))
    for part in ("z", "dt"):
        if c.parts[part]:
            _, bias = mixer.projection(part)
            if bias is not None:
                bias.zero_()
    w_o, b_o = proj["o"]
    mixer.out_proj.weight.copy_(w_o)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.copy_(b_o if b_o is not None else torch.zeros_like(mixer.out_proj.bias))


@torch.no_grad()
def seed_mimic(mixer: Mamba2Mixer) -> None:
    """mmMamba's seeding of the new parameters: dt projection zero, A = -e, a conv that
    passes the current token through (bias 0), gate rows xavier-uniform with gain 2^-2.5."""
    mixer.projection("dt")[0].zero_()
    mixer.A_log.fill_(1.0)  # A = -exp(1) = -e
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()
    if mixer.config.gate:
        nn.init.xavier_uniform_(mixer.projection("z")[0], gain=MIMIC_GATE_GAIN)


def _build_adapter(layer: nn.Module, index: int, cfg: Mamba2Config, keep_attention: bool) -> MambaAttention:
    attention = layer.self_attn
    ref = _output_projection(attention).weight
    mixer = Mamba2Mixer(cfg).to(device=ref.device, dtype=ref.dtype)
    return MambaAttention(mixer, getattr(attention, "layer_idx", index), attention if keep_attention else None)


def convert(model: nn.Module, layers: Any = "all", init: str = "attention", mimic: bool = False,
            keep_attention: bool = False, **mixer_overrides: Any) -> list[int]:
    """Replace the attention of `layers` of `model`'s decoder with Mamba-2 mixers, in place.

    Args:
        model: a causal LM or a VLM (its language model is converted), or a decoder.
        layers: see `select_layers`.
        init: "attention" (MaTVLM: from the layer's Q/K/V/O) or "random" (mamba's init).
        mimic: mmMamba's seeding and layout (see the module docstring).
        keep_attention: keep the attention beside the mixer (mmMamba's layer-wise stages).
        mixer_overrides: `Mamba2Config` fields (chunk_size, d_conv, d_state, ...).
    Returns:
        The converted layer indices.
    """
    if init not in ("attention", "random"):
        raise ValueError(f"init must be attention or random, got {init!r}")
    decoder = decoder_of(model)
    text_config = decoder.config
    if any(isinstance(layer.self_attn, MambaAttention) for layer in decoder.layers):
        raise ValueError("the model already has Mamba layers; convert an unconverted model")
    chosen = select_layers(layers, len(decoder.layers))
    if init == "attention" and mixer_overrides.get("d_state") not in (None, _attention_shape(text_config)[3]):
        raise ValueError("init='attention' needs d_state = the attention head_dim (B <- W_K); leave d_state unset")
    first = decoder.layers[chosen[0]].self_attn
    proj = attention_projections(first, *_attention_shape(text_config)[1:])
    cfg = mixer_config(text_config, mimic=mimic, has_bias=proj["q"][1] is not None,
                       out_bias=proj["o"][1] is not None, **mixer_overrides)
    for i in chosen:
        layer = decoder.layers[i]
        adapter = _build_adapter(layer, i, cfg, keep_attention)
        if init == "attention":
            init_from_attention(adapter.mamba, layer.self_attn)
        if mimic:
            seed_mimic(adapter.mamba)
        layer.self_attn = adapter
    setattr(text_config, HYBRID_KEY, {"mamba_layers": chosen, "mamba": cfg.to_dict(), "keep_attention": keep_attention,
                                      "init": init, "mimic": mimic})
    return chosen


def restore_structure(model: nn.Module) -> list[int]:
    """Rebuild the converted structure a config records (`students.load`, before the weights
    load); returns the Mamba layer indices, [] for an unconverted model."""
    decoder = decoder_of(model)
    info = getattr(decoder.config, HYBRID_KEY, None)
    if not info:
        return []
    cfg = Mamba2Config(**info["mamba"])
    for i in info["mamba_layers"]:
        layer = decoder.layers[i]
        layer.self_attn = _build_adapter(layer, i, cfg, info.get("keep_attention", False))
    return list(info["mamba_layers"])


def mamba_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers that hold a Mamba mixer."""
    return [i for i, layer in enumerate(decoder_of(model).layers) if isinstance(layer.self_attn, MambaAttention)]


def drop_attention(model: nn.Module) -> None:
    """Remove the attention a `keep_attention` conversion kept (after the layer-wise stages):
    the layers then run and decode on their mixers alone."""
    decoder = decoder_of(model)
    for layer in decoder.layers:
        adapter = layer.self_attn
        if isinstance(adapter, MambaAttention) and hasattr(adapter, "attention"):
            del adapter.attention
            del adapter.attn_out
    info = getattr(decoder.config, HYBRID_KEY, None)
    if info:
        info["keep_attention"] = False


def check_hybrid_fits(model: nn.Module, layers: Any = "ratio:0.25", init: str = "attention", **_: Any) -> None:
    """The `hybrid` options against a model, changing nothing: the layer spec against its
    decoder's depth (a model with Mamba layers keeps them). Raises ValueError."""
    if init not in ("attention", "random"):
        raise ValueError(f"init must be attention or random, got {init!r}")
    if not mamba_layers(model):
        select_layers(layers, len(decoder_of(model).layers))


def hybrid_transform(student: nn.Module, layers: Any = "ratio:0.25", init: str = "attention", mimic: bool = False,
                     keep_attention: bool = False, chunk_size: int | None = None,
                     d_conv: int | None = None) -> dict[str, Any]:
    """The `hybrid` student transform: convert attention layers of the student's language
    model to Mamba-2 (`convert`). A student that already has Mamba layers (loaded from a
    converted folder) keeps them; with `keep_attention=False` it drops attention a layer-wise
    stage kept beside them. Returns notes for the run's summary.

    Raises:
        ValueError: a layer spec or option that does not fit the model.
    """
    already = mamba_layers(student)
    if already:
        if not keep_attention:
            drop_attention(student)
        converted = already
    else:
        converted = convert(student, layers, init=init, mimic=mimic, keep_attention=keep_attention,
                            chunk_size=chunk_size, d_conv=d_conv)
    total = len(decoder_of(student).layers)
    return {"mamba_layers": converted, "attention_layers": total - len(converted), "init": init, "mimic": mimic,
            "keep_attention": keep_attention, "converted_before": bool(already)}
