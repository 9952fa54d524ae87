"""Mixture-of-depths over image tokens (p-MoD; docs/methods.md §14): chosen decoder layers of a
Hugging Face language model process only some of the image tokens; the rest skip the layer.

`mod_transform(model, schedule="prd")` turns decoder layers (Llama, Qwen2, Mistral, Phi-3: a
pre-norm block of `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`) of a causal
LM or of a VLM's language model into MoD layers, in place; names and weights stay as they were,
each MoD layer gains a `mod_router` (Linear(d, 1)). p-MoD's public code, as its defaults:

- Routing targets are the image tokens (`input_ids == image_token_id`, read where the model
  receives them, so it also holds inside `generate`); text and padding are never targets.
- The router reads the layer's input (before its norm); TanhNorm weights w = 0.2 tanh(r) + 1.
  The router starts at zero, so w = 1.
- Layer l keeps the top trunc(r_l * n_image) image tokens of each example by w (hard top-k)
  plus every text token. Kept tokens keep their original positions (RoPE) and attend causally
  to the kept tokens only.
- STRing reweighting as coded: a kept image token gets u + w * MLP(...) (u = h + attention),
  a skipped one w * h, text tokens u + MLP(...). So skipped tokens give the router a gradient,
  and a layer that keeps everything is, at w = 1, the dense layer exactly. `string_scope="layer"`
  scales the whole update of kept image tokens instead (the paper's figure).
- Progressive ratio decay: s(l) = cos(pi l / (L - 1)) / 2 + 1/2; layers with s(l) <= 0.85 are
  MoD layers with r_l = max(s(l), 0.15). The code's constant 31 is L - 1 here, so the mean
  retention is 0.5375 for every L divisible by 4.

A MoD layer keeps only its kept tokens' keys and values in a `transformers` cache
(`ModCacheLayer`), so its cache after prefill holds the text plus trunc(r_l * n_image) image
entries; decoding attends over that layer's own entries. Generated tokens are text and are
never skipped.

`TokenCounter` (`count_tokens(model)`) counts the tokens each layer processes and gives the
processed-token FLOPs proxy and the KV-cache proxy as ratios to the dense model.

The conversion is recorded in the config (`workbench_mod`), so `students.load` and an exported
folder's remote code rebuild it. This file imports only torch, transformers and its sibling
`hf_cache`, so it can be copied into exported folders.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from students.hf_cache import CACHE_KWARG, either_cache, state_layer
from transformers.cache_utils import DynamicLayer

CONFIG_KEY = "workbench_mod"
TARGETS = ("vision", "all")
STRING_SCOPES = ("mlp", "layer")
ROUTERS = ("tanhnorm", "gamma")
# fixed-ratio schedules: (first MoD layer, dense layers at the end)
SPANS = {"uniform": (0, 0), "fixed": (2, 1), "arank_mod": (3, 1)}
_BLOCK = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


# --------------------------------------------------------------------------- schedules


def prd_ratios(n_layers: int, max_ratio: float = 0.85, min_ratio: float = 0.15) -> list[float | None]:
    """p-MoD's progressive ratio decay for `n_layers` layers: None for a dense layer, else the
    layer's retention ratio."""
    if n_layers < 2:
        raise ValueError(f"progressive ratio decay needs at least 2 layers, got {n_layers}")
    out: list[float | None] = []
    for layer in range(n_layers):
        s = 0.5 * math.cos(layer * math.pi / (n_layers - 1)) + 0.5
        out.append(None if s > max_ratio else max(s, min_ratio))
    return out


def schedule_ratios(schedule: Any, n_layers: int, max_ratio: float = 0.85,
                    min_ratio: float = 0.15) -> list[float | None]:
    """Per-layer retention ratios of a schedule, None for a dense layer: `prd`, `fixed:<r>`
    (p-MoD's `deep_all`: layers 2 .. L-2), `arank_mod:<r>` (gamma-MoD's released choice: every
    layer but 0, 1, 2 and L-1), `uniform:<r>` (every layer, 1.0 included: routers everywhere,
    nothing skipped), or a list of `n_layers` entries, each a ratio in (0, 1] or null (a
    searched schedule)."""
    if isinstance(schedule, (list, tuple)):
        if len(schedule) != n_layers:
            raise ValueError(f"schedule lists {len(schedule)} ratios for {n_layers} decoder layers")
        try:
            ratios = [None if r is None else float(r) for r in schedule]
        except (TypeError, ValueError):
            raise ValueError(f"schedule entries must be ratios or null, got {list(schedule)}") from None
    elif schedule == "prd":
        if not 0 < min_ratio <= max_ratio <= 1:
            raise ValueError(f"need 0 < min_ratio <= max_ratio <= 1, got {min_ratio} and {max_ratio}")
        return prd_ratios(n_layers, max_ratio, min_ratio)
    elif isinstance(schedule, str) and schedule.partition(":")[0] in SPANS and ":" in schedule:
        kind, _, value = schedule.partition(":")
        try:
            r = float(value)
        except ValueError:
            raise ValueError(f"schedule {schedule!r}: {value!r} is not a ratio") from None
        first, from_end = SPANS[kind]
        ratios = [r if first <= i <= n_layers - 1 - from_end else None for i in range(n_layers)]
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use prd, fixed:<ratio>, arank_mod:<ratio>, "
                         "uniform:<ratio> or a list of per-layer ratios")
    bad = [r for r in ratios if r is not None and not 0 < r <= 1]
    if bad:
        raise ValueError(f"retention ratios must be in (0, 1], got {bad[0]}")
    return ratios


def mean_retention(ratios: list[float | None]) -> float:
    """The schedule's mean image-token retention over all layers (dense layers count 1)."""
    return sum(1.0 if r is None else r for r in ratios) / len(ratios)


def kept_count(ratio: float, n: int) -> int:
    """Image tokens a layer of retention `ratio` keeps out of `n`: trunc(ratio * n), as p-MoD."""
    return int(ratio * n)


# --------------------------------------------------------------------------- state and cache


class ModState:
    """What every MoD layer of one model reads during a forward: which of the new tokens are
    routing targets and which are real (not padding); set by a pre-hook where the model
    receives `input_ids`. Plus the token counter, when one is attached."""

    def __init__(self, image_token_id: int | None, targets: str):
        self.image_token_id, self.targets = image_token_id, targets
        self.target_mask: Tensor | None = None  # (batch, new tokens) bool
        self.valid_mask: Tensor | None = None
        self.image_rank: Tensor | None = None  # a training-free selector's ranking of the image tokens (0 = best)
        self.counter: TokenCounter | None = None
        self.prefill: Any = None  # a reducer's own prefill forward of a layer (students.reduce.FrameFusion)
        self.aux: dict[str, Tensor] = {}  # auxiliary losses of this forward (gamma routers: "mod_router")

    def read(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.image_rank, self.aux = None, {}
        if input_ids is None:  # embeddings only: no way to tell image tokens apart; every layer runs dense
            self.target_mask = self.valid_mask = None
            return
        n = input_ids.shape[1]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None or mask.dim() != 2 \
            else mask[:, -n:].bool()
        self.valid_mask = valid
        if self.targets == "all":
            self.target_mask = valid
        else:
            self.target_mask = (input_ids == self.image_token_id) & valid


class ModCacheLayer(DynamicLayer):
    """A MoD layer's entry in a `transformers` cache: keys and values of the tokens it kept,
    which of those slots are real (`key_mask`), and how many tokens the model has seen (its
    reported sequence length, so positions stay right even when layer 0 is a MoD layer)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.key_mask: Tensor | None = None
        self.seen = 0
        self.whole: list[list[Any]] = []  # per forward: [tokens, whether each one has its own slot]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def stored(self) -> int:
        """Key/value entries held (kept tokens, batch padding slots included)."""
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def record(self, slot_valid: Tensor, new_tokens: int) -> None:
        self.key_mask = slot_valid if self.key_mask is None else torch.cat([self.key_mask, slot_valid], 1)
        self.seen += new_tokens
        self.whole.append([new_tokens, slot_valid.shape[1] == new_tokens and bool(slot_valid.all())])

    def reset(self) -> None:
        super().reset()
        self.key_mask, self.seen, self.whole = None, 0, []

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last tokens (negative: how many; positive: the length to keep, the old
        convention). Only tokens this layer kept, each in its own slot - generated text - can
        be rolled back, not a prefill that skipped image tokens."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else self.seen - tokens_to_remove
        if remove <= 0 or self.key_mask is None:
            return
        left, segments = remove, [list(s) for s in self.whole]
        while left:
            if not segments or not segments[-1][1]:
                raise RuntimeError("a mixture-of-depths cache can only roll back tokens every layer kept "
                                   "(generated text), not into a prompt whose image tokens it skipped")
            take = min(left, segments[-1][0])
            segments[-1][0] -= take
            left -= take
            if not segments[-1][0]:
                segments.pop()
        self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]
        self.key_mask, self.seen, self.whole = self.key_mask[:, :-remove], self.seen - remove, segments

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))


class TokenCounter:
    """Tokens processed per layer over the prefill forwards it sees (`count_tokens`): the
    processed-token FLOPs proxy sum_l n_l (2 P_l + 2 nbar_l d) with nbar_l = (n_l + 1) / 2 keys per
    query (causal), and the KV proxy sum_l n_l / (L N), both as ratios to the dense model."""

    def __init__(self, layer_weights: list[int], hidden: int):
        self.layer_weights, self.hidden = layer_weights, hidden
        self.processed = [0.0] * len(layer_weights)  # FLOPs proxy per layer
        self.dense = [0.0] * len(layer_weights)
        self.kept = [0] * len(layer_weights)
        self.tokens = 0  # real tokens seen (per layer, dense)
        self.image = 0
        self.kept_image = [0] * len(layer_weights)

    def _flops(self, layer: int, n: Tensor) -> float:
        n = n.double()
        return float((n * (2 * self.layer_weights[layer] + self.hidden * (n + 1))).sum())

    def add(self, layer: int, kept: Tensor, valid: Tensor, kept_image: Tensor, image: Tensor) -> None:
        """One layer's per-example counts of one prefill forward."""
        self.processed[layer] += self._flops(layer, kept)
        self.dense[layer] += self._flops(layer, valid)
        self.kept[layer] += int(kept.sum())
        self.kept_image[layer] += int(kept_image.sum())
        if layer == 0:
            self.tokens += int(valid.sum())
            self.image += int(image.sum())

    def summary(self) -> dict[str, Any]:
        if not self.tokens:
            return {}
        layers = len(self.layer_weights)
        return {"flops_ratio": sum(self.processed) / sum(self.dense),
                "kv_ratio": sum(self.kept) / (layers * self.tokens),
                "image_retention": [k / self.image if self.image else 1.0 for k in self.kept_image],
                "tokens": self.tokens, "image_tokens": self.image}


# --------------------------------------------------------------------------- the layer


class ModLayerMixin:
    """The forward of a MoD decoder layer; mixed into the layer's own class (`_mod_class`), so
    its weights keep their names. Attributes set by `install`: `mod_router`, `mod_ratio`,
    `mod_index`, `mod_state`, `mod_scale`, `mod_bias`, `mod_string_scope`."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> Tensor:
        cache = either_cache(cache, past_key_values)
        state: ModState = self.mod_state
        h = hidden_states
        b, n, _ = h.shape
        valid = state.valid_mask if state.valid_mask is not None and state.valid_mask.shape == (b, n) \
            else torch.ones(b, n, dtype=torch.bool, device=h.device)
        targets = state.target_mask if state.target_mask is not None and state.target_mask.shape == (b, n) \
            else torch.zeros(b, n, dtype=torch.bool, device=h.device)
        entry = state_layer(cache, self.mod_index, ModCacheLayer) if cache is not None else None
        history = entry.stored() if entry is not None else 0
        if state.prefill is not None and history == 0:  # a reducer runs the prefill its own way (FrameFusion)
            return state.prefill(self, h, valid, targets, position_embeddings, cache, entry, kwargs)
        keep, w = self._route(h, valid, targets)
        if state.counter is not None and history == 0:
            state.counter.add(self.mod_index, keep.sum(1), valid.sum(1), (keep & targets).sum(1), targets.sum(1))
        if history == 0 and bool(keep[valid].all()):  # every real token stays: the dense computation
            out = self._mod_block(h, attention_mask, position_embeddings, cache, w, targets, position_ids, kwargs)
            if entry is not None:
                entry.record(valid, n)
            return out
        index, slot_valid = slots(keep)
        cos, sin = (gather(t.expand(b, *t.shape[1:]), index) for t in position_embeddings)
        mask = _attention_mask(entry.key_mask if entry is not None and history else None, slot_valid, h.dtype)
        out_kept = self._mod_block(gather(h, index), mask, (cos, sin), cache, gather(w, index),
                                   gather(targets, index), None, kwargs)
        if entry is not None:
            entry.record(slot_valid, n)
        # skipped image tokens: w h (p-MoD; gamma leaves them as they are); padding passes
        skipped = torch.where(targets[..., None], w * h, h) if self.mod_kind == "tanhnorm" else h
        return scatter(skipped, index, out_kept)

    def _route(self, h: Tensor, valid: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(keep (b, n) bool, w (b, n, 1)): which tokens this layer processes - every real text
        token and the chosen image tokens - and their weights; a gamma router also leaves its
        loss in the state."""
        state: ModState = self.mod_state
        b, n = valid.shape
        keep = valid & ~targets
        n_targets = targets.sum(1)
        kind, logits = self.mod_kind, None
        if kind == "select":  # a training-free selector chose for every such layer (students.reduce)
            w = torch.ones(b, n, 1, dtype=h.dtype, device=h.device)
            rank = state.image_rank
            if rank is None or rank.shape != (b, n):
                return keep | targets, w
        elif kind == "gamma":  # the shared 2-way router on the layer's normed input; p = P(process)
            logits = self._mod_shared(self.input_layernorm(h))
            w = logits.softmax(-1)[..., 1:]
        else:
            w = self.mod_scale * torch.tanh(self.mod_router(h)) + self.mod_bias  # (b, n, 1)
        threshold = getattr(self, "mod_threshold", None)
        if kind == "gamma" and threshold is not None and not self.training:  # gamma-MoD's inference routing
            keep = keep | (targets & (w.squeeze(-1) > threshold))
        elif targets.any():
            if kind != "select":  # hard top-k by the router's weight
                score = w.squeeze(-1).detach().masked_fill(~targets, float("-inf"))
                order = score.argsort(dim=1, descending=True, stable=True)
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=h.device).expand(b, n))
            k = torch.tensor([kept_count(self.mod_ratio, int(t)) for t in n_targets], device=h.device)
            keep = keep | (targets & (rank < k[:, None]))  # a selector's ranking: this layer's share, nested
        if logits is not None and bool(valid.any()):  # gamma: the router learns its own selection (and val/ reports it)
            ce = nn.functional.cross_entropy(logits[valid].float(), keep[valid].long())
            state.aux["mod_router"] = state.aux["mod_router"] + ce if "mod_router" in state.aux else ce
        return keep, w

    def _mod_block(self, h: Tensor, attention_mask: Tensor | None, position_embeddings: Any, cache: Any, w: Tensor,
                   targets: Tensor, position_ids: Tensor | None, kwargs: dict) -> Tensor:
        """The decoder block on (kept) tokens with STRing: u + w m for image tokens, u + m for text."""
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(h), attention_mask=attention_mask,
                                 position_ids=position_ids, position_embeddings=position_embeddings,
                                 **{CACHE_KWARG: cache}, **kwargs)
        dropout = getattr(self, "resid_attn_dropout", None)
        u = h + (dropout(attn) if dropout is not None else attn)
        m = self.mlp(self.post_attention_layernorm(u))
        dropout = getattr(self, "resid_mlp_dropout", None)
        m = dropout(m) if dropout is not None else m
        if self.mod_kind == "gamma":  # every kept token's MLP branch, text included
            return u + w * m
        scale = torch.where(targets[..., None], w, torch.ones_like(w))
        if self.mod_string_scope == "layer":
            return h + scale * (u - h + m)
        return u + scale * m


def slots(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept tokens of each example as slots, in order, padded to the longest kept set:
    (index (b, width) into the sequence - padding slots point one past its end, at a dummy
    row - and slot_valid (b, width))."""
    b, n = keep.shape
    counts = keep.sum(1)
    width = max(int(counts.max()), 1)
    slot_valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # kept positions first, in order
    return torch.where(slot_valid, order, torch.full_like(order, n)), slot_valid


def gather(x: Tensor, index: Tensor) -> Tensor:
    """(b, n, ...) -> (b, width, ...) at the slots' positions (`slots`)."""
    b, width = index.shape
    x = torch.cat([x, x[:, :1]], 1)
    return x.gather(1, index.view(b, width, *[1] * (x.dim() - 2)).expand(b, width, *x.shape[2:]))


def scatter(base: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """`base` (b, n, d) with the slots' rows replaced by `values` (b, width, d)."""
    b, n, d = base.shape
    out = torch.cat([base, base[:, :1]], 1).scatter(1, index[..., None].expand(*index.shape, d), values.to(base.dtype))
    return out[:, :n]


def _attention_mask(history: Tensor | None, slot_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, 1, width, history + width) additive mask: every real cached entry, and causal over the
    new kept slots (padding slots see themselves only, so no row is empty)."""
    b, width = slot_valid.shape
    causal = torch.ones(width, width, dtype=torch.bool, device=slot_valid.device).tril()
    allowed = causal[None] & slot_valid[:, None, :]
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=slot_valid.device)[None]
    if history is not None:
        allowed = torch.cat([history[:, None, :].expand(b, width, history.shape[1]), allowed], 2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=slot_valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


_CLASSES: dict[type, type] = {}


def _mod_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Mod{base.__name__}", (ModLayerMixin, base), {"__module__": __name__})
    return _CLASSES[base]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a causal LM or a VLM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers to route (get_decoder().layers)")
    return layers


def _hook_module(model: nn.Module) -> nn.Module:
    """The module that receives `input_ids` and the padding mask on every path (the top model's
    forward, `generate`, and callers of the inner model): the base model under the head."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def mod_state(model: nn.Module) -> ModState | None:
    return getattr(model, "_mod_state", None)


def aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """The auxiliary losses the model's last forward computed (gamma routers: `mod_router`)."""
    state = mod_state(model)
    return dict(state.aux) if state is not None else {}


def check_routable(model: nn.Module, chosen: Any = None) -> nn.ModuleList:
    """The decoder layers, if the `chosen` ones (default all) are pre-norm blocks a MoD layer or
    a reducer can run; raises ValueError naming the first that is not."""
    layers = decoder_layers(model)
    for i in chosen if chosen is not None else range(len(layers)):
        missing = [a for a in _BLOCK if not isinstance(getattr(layers[i], a, None), nn.Module)]
        if missing:
            raise ValueError(f"decoder layer {i} ({type(layers[i]).__name__}) has no {missing[0]}: token routing "
                             "needs a pre-norm block (input_layernorm, self_attn, post_attention_layernorm, mlp)")
    return layers


def restore_mod(model: nn.Module, record: dict[str, Any]) -> list[int]:
    """Rebuild the MoD layers a config records (zero routers: the weights load next)."""
    chosen = {int(i): float(r) for i, r in record["layers"].items()}
    install(model, chosen, record.get("targets", "vision"), router=record.get("router", "tanhnorm"),
            scale=float(record.get("router_scale", 0.2)), bias=float(record.get("router_bias", 1.0)),
            string_scope=record.get("string_scope", "mlp"), threshold=record.get("threshold"))
    return sorted(chosen)


def install(model: nn.Module, chosen: dict[int, float], targets: str = "vision", router: str = "tanhnorm",
            scale: float = 0.2, bias: float = 1.0, string_scope: str = "mlp", threshold: float | None = None
            ) -> ModState:
    """Make the decoder layers `chosen` ({index: ratio}) MoD layers sharing one `ModState`, read
    where the model receives `input_ids`. `router`: `tanhnorm` (p-MoD: one zero-initialised
    Linear(d, 1) per layer), `gamma` (gamma-MoD: one Linear(d, 2) shared by every MoD layer,
    registered on the decoder as `mod_router`), or `select` (no router: the layers keep what the
    state's `image_rank` says - a training-free selector: the top trunc(ratio * n_image) - and
    scale nothing)."""
    if router not in ROUTERS + ("select",):
        raise ValueError(f"router {router!r}: use one of {', '.join(ROUTERS)}")
    if mod_state(model) is not None:
        raise ValueError("the model routes its tokens already (a mixture-of-depths student or a reducer)")
    layers = check_routable(model, chosen)
    config = getattr(model, "config", None)
    state = ModState(getattr(config, "image_token_id", None) if config is not None else None, targets)
    object.__setattr__(model, "_mod_state", state)
    _hook_module(model).register_forward_pre_hook(state.read, with_kwargs=True)
    shared = None
    if router == "gamma":
        weight = next(p for p in layers[0].parameters())
        hidden = layers[0].post_attention_layernorm.weight.shape[0]
        shared = nn.Linear(hidden, 2, bias=False, device=weight.device, dtype=weight.dtype)  # PyTorch's default init
        model.get_decoder().mod_router = shared
    for i, ratio in sorted(chosen.items()):
        layer = layers[i]
        weight = next(p for p in layer.parameters())
        layer.__class__ = _mod_class(type(layer))
        layer.mod_kind, layer.mod_router = router, None
        if router == "tanhnorm":
            hidden = layer.post_attention_layernorm.weight.shape[0]
            layer.mod_router = nn.Linear(hidden, 1, bias=True, device=weight.device, dtype=weight.dtype)
            nn.init.zeros_(layer.mod_router.weight)
            nn.init.zeros_(layer.mod_router.bias)
        object.__setattr__(layer, "_mod_shared", shared)  # a reference, not a submodule: saved once
        layer.mod_ratio, layer.mod_index, layer.mod_state = ratio, i, state
        layer.mod_scale, layer.mod_bias, layer.mod_string_scope = scale, bias, string_scope
        layer.mod_threshold = threshold
    return state


def check_mod_options(schedule: Any = "prd", max_ratio: float = 0.85, min_ratio: float = 0.15,
                      targets: str = "vision", router: str = "tanhnorm", router_scale: float = 0.2,
                      router_bias: float = 1.0, string_scope: str = "mlp", threshold: float | None = None) -> None:
    """The `mod` transform's options that need no model, checked when a config loads (before any
    stage trains); raises ValueError."""
    if targets not in TARGETS:
        raise ValueError(f"targets {targets!r}: use one of {', '.join(TARGETS)}")
    if router not in ROUTERS:
        raise ValueError(f"router {router!r}: use one of {', '.join(ROUTERS)}")
    if threshold is not None and (router != "gamma" or not 0 <= threshold < 1):
        raise ValueError(f"threshold routing is gamma-MoD's (router: gamma) with 0 <= threshold < 1, got {threshold}")
    if string_scope not in STRING_SCOPES:
        raise ValueError(f"string_scope {string_scope!r}: use one of {', '.join(STRING_SCOPES)}")
    n = len(schedule) if isinstance(schedule, (list, tuple)) else 8  # the list's own length; any depth otherwise
    schedule_ratios(schedule, n, max_ratio, min_ratio)


def check_mod_fits(model: nn.Module, schedule: Any = "prd", max_ratio: float = 0.85, min_ratio: float = 0.15,
                   targets: str = "vision", **_: Any) -> list[float | None] | None:
    """The `mod` options against a model's decoder, changing nothing: the schedule's per-layer
    ratios if it fits (the list's length, at least one MoD layer, pre-norm blocks, image tokens to
    route); None for a MoD student, which keeps its own layers. A multi-stage run checks its later
    stages' options with this before the first trains. Raises ValueError."""
    if mod_state(model) is not None and getattr(model.config, CONFIG_KEY, None) is not None:
        return None
    if targets == "vision" and getattr(getattr(model, "config", None), "image_token_id", None) is None:
        raise ValueError(f"{type(model).__name__} has no image_token_id: route targets='all' for a language model")
    n_layers = len(decoder_layers(model))
    ratios = schedule_ratios(schedule, n_layers, max_ratio, min_ratio)
    chosen = [i for i, r in enumerate(ratios) if r is not None]
    if not chosen:
        raise ValueError(f"schedule {schedule!r} makes no layer of {n_layers} a MoD layer")
    check_routable(model, chosen)
    return ratios


def mod_transform(student: nn.Module, schedule: Any = "prd", max_ratio: float = 0.85, min_ratio: float = 0.15,
                  targets: str = "vision", router: str = "tanhnorm", router_scale: float = 0.2,
                  router_bias: float = 1.0, string_scope: str = "mlp", threshold: float | None = None
                  ) -> dict[str, Any]:
    """The `mod` student transform (p-MoD): the decoder layers of the language model the schedule
    gives a ratio become mixture-of-depths layers over image tokens (`targets="all"`: over
    every token). Returns notes for the run's summary: the MoD layers and the mean retention.

    `router: gamma` is gamma-MoD's: one Linear(d, 2) shared by every MoD layer (2 d parameters),
    reading each layer's normed input; p = softmax(.)[1] ranks the image tokens; every kept
    token's MLP branch is scaled by p, skipped tokens pass as they are; in training the router
    learns its own selection through a cross-entropy against it (`students.mod.aux_losses`, the
    `mod_router` loss term, weight 0.01 in gamma-MoD). Text is never routed, so every text token
    is processed by every layer (gamma-MoD's masked routing). With `threshold` (gamma-MoD: 0.005)
    a gamma student in eval mode keeps every image token whose p exceeds it instead of the top-k
    (training always routes by top-k).

    Raises:
        ValueError: an unknown schedule, target or STRing scope, a ratio outside (0, 1], a
            schedule with no MoD layer, or a decoder whose layers are not pre-norm blocks.
    """
    check_mod_options(schedule, max_ratio, min_ratio, targets, router, router_scale, router_bias, string_scope,
                      threshold)
    config = student.config
    if mod_state(student) is not None:  # a MoD student loaded from its folder keeps its layers
        record = getattr(config, CONFIG_KEY, None)
        if record is None:
            raise ValueError("the model has a token reducer installed; apply `mod` to the model itself")
        return {"mod_layers": sorted(int(i) for i in record["layers"]), "already_mod": True}
    ratios = check_mod_fits(student, schedule, max_ratio, min_ratio, targets)
    chosen = {str(i): r for i, r in enumerate(ratios) if r is not None}
    record = {"layers": chosen, "schedule": schedule if isinstance(schedule, str) else list(ratios),
              "targets": targets, "router": router, "router_scale": router_scale, "router_bias": router_bias,
              "string_scope": string_scope, "threshold": threshold}
    restore_mod(student, record)
    setattr(config, CONFIG_KEY, record)
    return {"mod_layers": sorted(int(i) for i in chosen), "mean_retention": round(mean_retention(ratios), 6)}


class count_tokens:  # noqa: N801 - used as a context manager
    """`with count_tokens(model) as counter:` counts what every layer processes in the prefill
    forwards inside the block (`counter.summary()`); a dense model (no MoD layer) counts every
    real token at every layer through a pre-hook, so both report on the same axes."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> TokenCounter:
        layers = decoder_layers(self.model)
        weights = [sum(m.weight.numel() for name, m in layer.named_modules()
                       if isinstance(m, nn.Linear) and not name.startswith("mod_router")) for layer in layers]
        hidden = self.model.config.get_text_config().hidden_size
        self.counter = TokenCounter(weights, hidden)
        state = mod_state(self.model)
        self._handles = []
        if state is not None:
            state.counter = self.counter
            dense = [i for i, layer in enumerate(layers) if not isinstance(layer, ModLayerMixin)]
        else:
            state = ModState(getattr(self.model.config, "image_token_id", None), "vision")
            self._handles.append(_hook_module(self.model).register_forward_pre_hook(state.read, with_kwargs=True))
            dense = list(range(len(layers)))
        for i in dense:
            self._handles.append(layers[i].register_forward_pre_hook(self._dense_hook(i, state), with_kwargs=True))
        self.state = state
        return self.counter

    def _dense_hook(self, index: int, state: ModState):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cache = either_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
            if cache is not None and cache.get_seq_length(index) > 0:
                return  # decoding: not a prefill
            b, n = h.shape[:2]
            valid = state.valid_mask if state.valid_mask is not None and state.valid_mask.shape == (b, n) \
                else torch.ones(b, n, dtype=torch.bool, device=h.device)
            image = state.target_mask if state.target_mask is not None and state.target_mask.shape == (b, n) \
                else torch.zeros(b, n, dtype=torch.bool, device=h.device)
            self.counter.add(index, valid.sum(1), valid.sum(1), (image & valid).sum(1), (image & valid).sum(1))
        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        if mod_state(self.model) is self.state:
            self.state.counter = None
