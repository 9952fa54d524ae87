"""Training-free visual-token reducers (docs/methods.md §15): applied to a trained teacher or
student at evaluation and in the benches, never trained.

`attention_prune(model, layer=1, keep=0.5, queries="after_image")` is Mini-Monkey's scale
compression mechanism in its FastV form. At decoder layer `layer` the image tokens are scored
by the attention the chosen queries pay them: softmax(QK^T / sqrt(d)) of that layer, causal,
averaged over heads and queries. Only the top trunc(keep * n_image) image tokens go on through
the deeper layers, at their original positions, and the layers' caches hold only those. It
runs on the mixture-of-depths machinery of `students.mod`: the layers after `layer` become MoD
layers without routers, so `count_tokens`, cached `generate` and the proxies in `evaluate`
apply unchanged.

A list of keep fractions, one per layer after `layer` and non-increasing, prunes progressively
(the kept sets nested): the per-layer schedule `g_search` finds.

Query sets: `after_image` (every real token after the image; Mini-Monkey's code), `last_token`
(FastV-style and FrameFusion's prune step), `text` (every real text token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from students.hf_cache import either_cache
from students.mod import decoder_layers, install

QUERIES = ("after_image", "last_token", "text")


def image_token_scores(layer: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], valid: Tensor,
                       image: Tensor, queries: str = "after_image") -> Tensor:
    """(batch, n) attention each image token receives at `layer` (its own q/k projections on its
    normed input, RoPE, causal softmax over real keys), averaged over heads and the chosen
    queries; -inf where not an image token."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, head_dim)
    k = attn.k_proj(x).view(b, n, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)).float() * getattr(attn, "scaling", head_dim ** -0.5)
    allowed = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()[None] & valid[:, None, :]
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)  # (b, n, n)
    positions = torch.arange(n, device=hidden.device)
    last_image = torch.where(image, positions, -1).amax(1)
    if queries == "after_image":
        chosen = valid & (positions[None] > last_image[:, None])
    elif queries == "last_token":
        last = torch.where(valid, positions, -1).amax(1)
        chosen = positions[None] == last[:, None]
    else:
        chosen = valid & ~image
    weights = chosen.float() / chosen.float().sum(1, keepdim=True).clamp(min=1)
    scores = (weights[:, :, None] * probs).sum(1)  # (b, n): mean attention received
    return scores.masked_fill(~image, float("-inf"))


def attention_prune(model: nn.Module, layer: int = 1, keep: Any = 0.5, queries: str = "after_image") -> dict[str, Any]:
    """Install attention-importance pruning on `model` (in place): image tokens ranked by the
    attention they receive at decoder layer `layer`; every layer after it keeps the top `keep`
    fraction - or, with a list (or "0.9/0.7/0.5" in a spec), one non-increasing fraction per
    layer after `layer` (a G-Search schedule; the kept sets are nested). Returns notes.

    Raises:
        ValueError: a layer outside the decoder (or the last one), keep fractions outside
            (0, 1], increasing or of the wrong count, an unknown query set, or a model that
            routes its tokens already.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers) - 1:
        raise ValueError(f"layer must be in 0..{len(layers) - 2} (the layers after it are pruned), got {layer}")
    deeper = list(range(layer + 1, len(layers)))
    keeps = _keeps(keep, len(deeper))
    if queries not in QUERIES:
        raise ValueError(f"queries {queries!r}: use one of {', '.join(QUERIES)}")
    state = install(model, dict(zip(deeper, keeps)), router="select")

    def rank(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = either_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        b, n = hidden.shape[:2]
        if state.target_mask is None or state.target_mask.shape != (b, n) or not state.target_mask.any() or (
                cache is not None and cache.get_seq_length(layer) > 0):
            return  # decoding, or no image: nothing to choose
        with torch.no_grad():
            scores = image_token_scores(module, hidden, kwargs["position_embeddings"], state.valid_mask,
                                        state.target_mask, queries)
        order = scores.argsort(dim=1, descending=True, stable=True)
        state.image_rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=hidden.device).expand(b, n))

    layers[layer].register_forward_pre_hook(rank, with_kwargs=True)
    return {"reducer": "attention_prune", "layer": layer, "keep": keeps if len(set(keeps)) > 1 else keeps[0],
            "queries": queries, "pruned_layers": deeper}


def _keeps(keep: Any, count: int) -> list[float]:
    """One keep fraction per pruned layer from a number, a list, or "a/b/c"."""
    if isinstance(keep, str):
        try:
            keep = [float(k) for k in keep.split("/")]
        except ValueError:
            raise ValueError(f"keep {keep!r}: a fraction, or fractions separated by '/'") from None
    keeps = [float(k) for k in keep] if isinstance(keep, (list, tuple)) else [float(keep)] * count
    if len(keeps) != count:
        raise ValueError(f"keep lists {len(keeps)} fractions for the {count} layers after the scoring layer")
    if any(not 0 < k <= 1 for k in keeps):
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if any(b > a for a, b in zip(keeps, keeps[1:])):
        raise ValueError(f"keep fractions must not increase with depth, got {keeps}")
    return keeps


REDUCERS = {"attention_prune": attention_prune}


def parse_reducer(spec: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value,key=value` (`attention_prune:layer=1,keep=0.5`) -> (name, options)."""
    name, _, rest = spec.partition(":")
    if name not in REDUCERS:
        raise ValueError(f"unknown reducer {name!r}; reducers: {', '.join(REDUCERS)}")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"reducer option {item!r} is not key=value")
        try:
            options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            options[key] = value
    return name, options


def apply_reducer(model: nn.Module, spec: str) -> dict[str, Any]:
    """Install the reducer `spec` names on `model`; bad names and options raise ValueError."""
    import inspect

    name, options = parse_reducer(spec)
    fn = REDUCERS[name]
    known = set(inspect.signature(fn).parameters) - {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"reducer {name} has no option {unknown[0]!r}; options: {', '.join(sorted(known))}")
    return fn(model, **options)
