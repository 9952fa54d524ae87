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

`random_prune` ranks the image tokens at random instead: the baseline a scorer has to beat.

`framefusion(model, cost=0.3, sim_th=0.6, ratio_lb=0.1)` is FrameFusion's merge-then-prune for
multi-frame inputs (`FrameFusion`): near-copies of the previous frame's token at the same patch
merge into one, then the image tokens are pruned once to what the compute budget leaves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from students.errors import ReducerError
from students.hf_cache import CACHE_KWARG, either_cache
from students.mod import _attention_mask, decoder_layers, gather, install, kept_count, scatter, slots

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
    if queries not in QUERIES:
        raise ValueError(f"queries {queries!r}: use one of {', '.join(QUERIES)}")

    def scores(module: nn.Module, hidden: Tensor, kwargs: dict, state: Any) -> Tensor:
        return image_token_scores(module, hidden, kwargs["position_embeddings"], state.valid_mask, state.target_mask,
                                  queries)

    return {"reducer": "attention_prune", **_prune(model, layer, keep, scores), "queries": queries}


def random_prune(model: nn.Module, layer: int = 1, keep: Any = 0.5, seed: int = 0) -> dict[str, Any]:
    """Like `attention_prune`, with the image tokens ranked at random (a fresh draw per forward
    from a generator seeded with `seed`): the baseline a scorer has to beat."""
    generator = torch.Generator().manual_seed(int(seed))

    def scores(module: nn.Module, hidden: Tensor, kwargs: dict, state: Any) -> Tensor:
        drawn = torch.rand(hidden.shape[:2], generator=generator).to(hidden.device)
        return drawn.masked_fill(~state.target_mask, float("-inf"))

    return {"reducer": "random_prune", **_prune(model, layer, keep, scores), "seed": seed}


def _prune(model: nn.Module, layer: int, keep: Any, scores: Any) -> dict[str, Any]:
    """The layers after `layer` keep the top `keep` of the image tokens by `scores(layer module,
    its input, its kwargs, state)` (b, n), computed at `layer` in every prefill."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers) - 1:
        raise ValueError(f"layer must be in 0..{len(layers) - 2} (the layers after it are pruned), got {layer}")
    deeper = list(range(layer + 1, len(layers)))
    keeps = _keeps(keep, len(deeper))
    state = install(model, dict(zip(deeper, keeps)), router="select")

    def rank(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = either_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        b, n = hidden.shape[:2]
        if state.target_mask is None or state.target_mask.shape != (b, n) or not state.target_mask.any() or (
                cache is not None and cache.get_seq_length(layer) > 0):
            return  # decoding, or no image: nothing to choose
        with torch.no_grad():
            order = scores(module, hidden, kwargs, state).argsort(dim=1, descending=True, stable=True)
        state.image_rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=hidden.device).expand(b, n))

    layers[layer].register_forward_pre_hook(rank, with_kwargs=True)
    return {"layer": layer, "keep": keeps if len(set(keeps)) > 1 else keeps[0], "pruned_layers": deeper}


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


def kept_image_tokens(model: nn.Module) -> Tensor | None:
    """(b, n) bool: the image tokens of the last prefill that reached the deepest layer under
    a reducer (`attention_prune`, `random_prune`: the top of the ranking at the last layer's
    keep; `framefusion`: the tokens left), or None for a model without one."""
    fusion = getattr(model, "_framefusion", None)
    state = getattr(model, "_mod_state", None)
    if state is None or state.target_mask is None:
        return None
    if fusion is not None:
        return fusion.alive & state.target_mask
    if state.image_rank is None:
        return None
    ratio = decoder_layers(model)[-1].mod_ratio
    counts = torch.tensor([kept_count(ratio, int(t)) for t in state.target_mask.sum(1)], device=state.image_rank.device)
    return state.target_mask & (state.image_rank < counts[:, None])


# --------------------------------------------------------------------------- FrameFusion


def framefusion_prune_ratio(sparsity: list[float], cost: float, n_layers: int) -> float:
    """FrameFusion's budget: after merge steps that removed the fractions `sparsity` of the
    image tokens left, the uniform prune ratio of the rest of the `n_layers` layers that spends
    `cost` (a fraction of the dense image-token compute) in all: 1 - R with
    R = (L c - C_k) / ((L - k) P_k), P_k = prod(1 - s_i), C_k = sum_i prod_{j <= i}(1 - s_j);
    0 when R > 1 or when no layer is left (merging can go on after the last layer's attention).
    Raises ReducerError (a ValueError) when the merges alone spent more than the budget."""
    if len(sparsity) >= n_layers:
        return 0.0
    kept, spent = 1.0, 0.0
    for s in sparsity:
        kept *= 1 - s
        spent += kept
    left = n_layers * cost - spent
    if left < 0:
        raise ReducerError(f"FrameFusion cost {cost} is too small: the layers it merged in already spent "
                           f"{spent:.3f} of the {n_layers} layers' image-token compute ({n_layers * cost:.3f} "
                           f"allowed); raise cost (at least 1/{n_layers} = {1 / n_layers:.3f})")
    rest = left / ((n_layers - len(sparsity)) * kept)
    return 0.0 if rest > 1 else 1 - rest


def frame_tokens(model: nn.Module) -> int | None:
    """Image tokens per image of a LLaVA-style model (its vision config's patch grid, plus the
    CLS token under the `full` feature strategy), or None when the config does not say."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not size or not patch:
        return None
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return (size // patch) ** 2 + int(full)


class FrameFusion:
    """FrameFusion's merge-then-prune over the frames of a prefill (one clip per example).

    Image token k of an example (in order) has patch type k mod `frame` (its place in its
    frame). At the input of layer 0 and after the attention of every layer, each image token
    still there is compared (cosine) with the previous frame's token of its patch type still
    there; those at or above `sim_th` merge into the run's head (the nearest earlier token of
    the type that does not merge): the head becomes the mean of the run, the others leave the
    sequence (its keys, values and positions go with them). Merging stops when it removes
    less than `ratio_lb` of the image tokens left - then, after the next attention, the image
    tokens are pruned once to the uniform keep the cost budget leaves
    (`framefusion_prune_ratio`), ranked by the attention the last token pays them - or when it
    would overspend the budget, which caps that merge at the most similar tokens and skips
    pruning. Decisions are per example; text is never touched.
    """

    def __init__(self, n_layers: int, frame: int, cost: float, sim_th: float, ratio_lb: float):
        self.n_layers, self.frame, self.cost, self.sim_th, self.ratio_lb = n_layers, frame, cost, sim_th, ratio_lb
        self.alive: Tensor | None = None

    def start(self, image: Tensor, valid: Tensor) -> None:
        b, n = image.shape
        order = image.long().cumsum(1) - 1
        self.patch = torch.where(image, order % self.frame, -1)
        self.alive = valid.clone()
        self.sparsity: list[list[float]] = [[] for _ in range(b)]
        self.merging, self.pending = [True] * b, [False] * b

    def merge(self, x: Tensor) -> Tensor:
        """One merge step on every example still merging; returns the new hidden states."""
        x = x.clone()
        for i in range(x.shape[0]):
            if self.merging[i]:
                self._merge_one(x, i)
        return x

    def _merge_one(self, x: Tensor, i: int) -> None:
        patch, alive = self.patch[i], self.alive[i]
        where = (alive & (patch >= 0)).nonzero().squeeze(1)
        if not len(where):
            self.merging[i] = False
            return
        order = where[torch.argsort(patch[where] * x.shape[1] + where)]  # by patch type, then by frame
        rows, kinds = x[i, order].float(), patch[order]
        sim = torch.full((len(order),), -2.0, device=x.device)
        sim[1:] = nn.functional.cosine_similarity(rows[1:], rows[:-1], dim=-1)
        sim[1:][kinds[1:] != kinds[:-1]] = -2.0
        upper = framefusion_prune_ratio(self.sparsity[i], self.cost, self.n_layers)
        chosen = sim >= self.sim_th
        ratio = float(chosen.sum()) / len(order)
        if ratio < upper:
            self.sparsity[i].append(ratio)
            if ratio < self.ratio_lb:
                self.merging[i], self.pending[i] = False, True
        else:  # the budget caps this merge; no pruning afterwards
            chosen = torch.zeros_like(chosen)
            chosen[sim.topk(int(upper * len(order))).indices] = True
            chosen &= sim > -2.0
            self.merging[i] = False
        if not chosen.any():
            return
        positions = torch.arange(len(order), device=x.device)
        head = torch.where(~chosen, positions, 0).cummax(0).values  # each token's run head
        sums = rows.index_add(0, head[chosen], rows[chosen])
        counts = torch.ones(len(order), device=x.device).index_add(0, head[chosen], torch.ones(int(chosen.sum()),
                                                                                              device=x.device))
        heads = torch.unique(head[chosen])
        x[i, order[heads]] = (sums[heads] / counts[heads, None]).to(x.dtype)
        self.alive[i, order[chosen]] = False

    def prune(self, scores: Tensor) -> None:
        """The pending examples' one pruning step, by `scores` (b, n; -inf where not an image token)."""
        for i in range(scores.shape[0]):
            if not self.pending[i]:
                continue
            self.pending[i] = False
            image = self.alive[i] & (self.patch[i] >= 0)
            n_image = int(image.sum())
            keep = round(n_image * (1 - framefusion_prune_ratio(self.sparsity[i], self.cost, self.n_layers)))
            if keep >= n_image:
                continue
            top = scores[i].masked_fill(~image, float("-inf")).topk(keep).indices
            self.alive[i] &= ~image
            self.alive[i, top] = True

    def layer(self, layer: nn.Module, h: Tensor, valid: Tensor, image: Tensor, position_embeddings: tuple,
              cache: Any, entry: Any, kwargs: dict) -> Tensor:
        """A decoder layer's prefill with FrameFusion (`ModState.prefill`)."""
        b, n, _ = h.shape
        if layer.mod_index == 0:
            self.start(image, valid)
            h = self.merge(h)
        elif self.alive is None or self.alive.shape != (b, n):
            raise RuntimeError("FrameFusion's state does not match this forward (layer 0 did not run first)")
        state = layer.mod_state
        index, slot_valid = slots(self.alive)
        cos, sin = (gather(t.expand(b, *t.shape[1:]), index) for t in position_embeddings)
        if state.counter is not None:
            state.counter.add(layer.mod_index, self.alive.sum(1), valid.sum(1), (self.alive & image).sum(1),
                              image.sum(1))
        x = gather(h, index)
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                                  attention_mask=_attention_mask(None, slot_valid, h.dtype), **{CACHE_KWARG: cache},
                                  **kwargs)
        if entry is not None:
            entry.record(slot_valid, n)
        u = scatter(h, index, x + attn)
        if any(self.pending):  # the layer's own attention from the last token ranks the image tokens
            with torch.no_grad():
                scores = image_token_scores(layer, x, (cos, sin), slot_valid, gather(image & self.alive, index),
                                            "last_token")
            self.prune(torch.full((b, n + 1), float("-inf"), device=h.device).scatter(1, index, scores)[:, :n])
        if any(self.merging):
            u = self.merge(u)
        index, _ = slots(self.alive)
        x = gather(u, index)
        return scatter(u, index, x + layer.mlp(layer.post_attention_layernorm(x)))


def framefusion(model: nn.Module, cost: float = 0.3, sim_th: float = 0.6, ratio_lb: float = 0.1,
                frame: int | None = None) -> dict[str, Any]:
    """Install FrameFusion (`FrameFusion`) on `model` (in place) with the compute budget `cost`
    (a fraction of the dense image-token compute over all decoder layers; the budget's layer
    count is the model's own), the similarity threshold `sim_th` and the merge floor
    `ratio_lb`. `frame`: image tokens per frame (default: the model's tokens per image). Only
    prefills are reduced; decoding attends over what each layer kept. Returns notes.

    Raises:
        ValueError: options out of range, or no frame size given or known.
    """
    layers = decoder_layers(model)
    frame = frame or frame_tokens(model)
    if not frame or frame < 1:
        raise ValueError("FrameFusion needs the image tokens per frame: the model's config does not give them; "
                         "pass frame=N")
    if not 0 < cost <= 1 or not -1 <= sim_th <= 1 or not 0 <= ratio_lb <= 1:
        raise ValueError(f"FrameFusion options: cost in (0, 1], sim_th in [-1, 1], ratio_lb in [0, 1]; got "
                         f"cost={cost}, sim_th={sim_th}, ratio_lb={ratio_lb}")
    state = install(model, {i: 1.0 for i in range(len(layers))}, router="select")
    fusion = FrameFusion(len(layers), int(frame), float(cost), float(sim_th), float(ratio_lb))
    state.prefill = fusion.layer
    object.__setattr__(model, "_framefusion", fusion)
    return {"reducer": "framefusion", "cost": cost, "sim_th": sim_th, "ratio_lb": ratio_lb, "frame": int(frame)}


REDUCERS = {"attention_prune": attention_prune, "random_prune": random_prune, "framefusion": framefusion}


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
