"""Speculative decoding (docs/methods.md §16): a draft model proposes `gamma` tokens, the target
scores them all in one forward pass, and the standard acceptance rule keeps the output exactly
the target's - token for token when greedy, in distribution when sampling.

`speculative_generate(target, draft, input_ids, ...)` works for any Hugging Face causal LM or
VLM pair sharing a tokenizer (the draft reads the same prompt, image tokens included, with
`pixel_values` at prefill). One prompt at a time (batch size 1), as in `transformers`'
assisted generation. Per round:

1. the draft, from its cache, samples x_1..x_gamma from its distributions q_i (argmax when
   greedy);
2. the target runs the uncached tokens plus x_1..x_gamma once, giving p_1..p_{gamma+1};
3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)) (greedy: x_i == argmax p_i);
   at the first rejection a token is drawn from norm(max(0, p_i - q_i)) (greedy: argmax p_i)
   and the round ends; if all are accepted, a bonus token is drawn from p_{gamma+1};
4. both caches are rolled back to the accepted prefix: attention caches (and the
   mixture-of-depths ones) are cropped; recurrent states (Mamba-2, MLGRU), which hold no
   per-token history, are restored from a copy taken before the round and the accepted tokens
   are run again (a `replay` pass, counted apart).

Sampling follows `temperature` and `top_k` applied to both models' logits alike (the output is
the target's *tempered, truncated* distribution). `SpecStats` counts what the bench reports:
empirical acceptance alpha, the analytic sum_v min(p, q) per position, mean accepted length
tau (tokens per target pass), target and draft passes.

This file imports only torch and its sibling `hf_cache`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from students.hf_cache import CACHE_KWARG, StateCacheLayer, output_cache


@dataclass
class SpecStats:
    """Counts of one or more speculative generations."""

    rounds: int = 0
    proposed: int = 0  # draft tokens proposed
    tested: int = 0  # of those, the ones the rule decided on (up to the first rejection)
    accepted: int = 0  # of those, accepted
    emitted: int = 0  # tokens generated (accepted + one per round, up to the budget)
    target_passes: int = 0  # verification forwards (one per round; the prompt's prefill not counted)
    draft_passes: int = 0
    replay_passes: int = 0  # target/draft forwards that re-run accepted tokens into recurrent states
    overlap: float = 0.0  # sum over tested positions of sum_v min(p, q)
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        """Empirical acceptance: accepted / tested draft tokens (a token after a rejection is
        never tested)."""
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def alpha_analytic(self) -> float:
        """Mean of sum_v min(p(v), q(v)) over the tested positions (1 - mean total variation):
        what alpha estimates; equal to it when greedy."""
        return self.overlap / self.tested if self.tested else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verification round (EAGLE's mean accepted length)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "alpha_analytic": self.alpha_analytic, "tau": self.tau, "rounds": self.rounds,
                "proposed": self.proposed, "tested": self.tested, "accepted": self.accepted, "emitted": self.emitted,
                "target_passes": self.target_passes, "draft_passes": self.draft_passes,
                "replay_passes": self.replay_passes}


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): tokens per round when each draft token is accepted
    independently with probability alpha (Leviathan et al.)."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def distribution(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """Probabilities the sampler draws from: logits / temperature, truncated to the top k;
    temperature 0 is greedy (one-hot at the argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


def accept_probability(p: Tensor, q: Tensor, token: int) -> float:
    """min(1, p(token) / q(token)): the chance a drafted token is kept."""
    return 1.0 if float(q[token]) <= 0 else min(1.0, float(p[token]) / float(q[token]))


def residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)), what a rejection draws from (p itself where q covers p exactly)."""
    rest = (p - q).clamp(min=0)
    total = rest.sum()
    return rest / total if float(total) > 0 else p


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def verify(p: Tensor, q: Tensor, drafted: list[int], greedy: bool, generator: torch.Generator | None
           ) -> tuple[int, int]:
    """The acceptance rule on one round: p (gamma + 1, V) target probabilities, q (gamma, V)
    draft probabilities, the drafted tokens. Returns (accepted count k, the next token)."""
    for i, token in enumerate(drafted):
        if greedy:
            if token != int(p[i].argmax()):
                return i, int(p[i].argmax())
            continue
        u = float(torch.rand((), generator=generator))
        if u >= accept_probability(p[i], q[i], token):
            return i, _draw(residual(p[i], q[i]), generator)
    last = p[len(drafted)]
    return len(drafted), int(last.argmax()) if greedy else _draw(last, generator)


class _Side:
    """One model with its cache and the number of tokens of the sequence the cache holds; with
    `keep_hidden` (the target of a draft head) also its final hidden state and input embedding
    at each of those tokens."""

    def __init__(self, model: torch.nn.Module, extra: dict[str, Any], keep_hidden: bool = False):
        from transformers import DynamicCache

        self.model, self.extra = model.eval(), dict(extra)  # pixel_values & co., for the prefill only
        self.cache = DynamicCache()
        self.length = 0
        self.saved: list[tuple[int, Any]] = []
        self.keep_hidden = keep_hidden
        self.features: Tensor | None = None  # (length, d) final hidden states
        self.embeds: Tensor | None = None  # (length, d) input embeddings (visual ones at image tokens)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits (n_new, V) for the uncached tail of `ids` (1, n)."""
        new = ids[:, self.length:]
        mask = torch.ones(1, ids.shape[1], dtype=torch.long, device=ids.device)
        out = self.model(input_ids=new, attention_mask=mask, use_cache=True, **{CACHE_KWARG: self.cache},
                         **(self.extra if self.length == 0 else {}),
                         **({"output_hidden_states": True} if self.keep_hidden else {}))
        self.cache = output_cache(out) or self.cache
        if self.keep_hidden:
            old = self.length
            self.features = _extend(self.features, old, out.hidden_states[-1][0])
            self.embeds = _extend(self.embeds, old, out.hidden_states[0][0])
        self.length = ids.shape[1]
        return out.logits[0]

    def next_logits(self, seq: Tensor) -> Tensor:
        return self.forward(seq)[-1]

    def save(self) -> None:
        """Copy the recurrent states (small) before a round that may be rolled back."""
        self.saved = [(i, copy.deepcopy(layer)) for i, layer in enumerate(self.cache.layers)
                      if isinstance(layer, StateCacheLayer)]
        self.saved_length = self.length

    def prefill(self, ids: Tensor) -> None:
        """Run the prompt but its last token, so that every round starts from a cache (not when
        that token is an image token: a VLM takes an image's tokens in one call)."""
        image = getattr(getattr(self.model, "config", None), "image_token_id", None)
        if ids.shape[1] > 1 and int(ids[0, -1]) != image:
            self.forward(ids[:, :-1])

    def rollback(self, ids: Tensor, keep: int) -> bool:
        """Make the cache hold the first `keep` tokens of `ids`; True if that took a replay pass."""
        if keep >= self.length:
            return False
        recurrent = any(isinstance(layer, StateCacheLayer) for layer in self.cache.layers)
        if not recurrent:
            self.cache.crop(keep - self.length)  # negative: how many tokens to drop
            self.length = keep
            self.features = None if self.features is None else self.features[:keep]
            self.embeds = None if self.embeds is None else self.embeds[:keep]
            return False
        if self.saved_length == 0:  # the states were made in this round: start again from nothing
            from transformers import DynamicCache

            self.cache, self.length = DynamicCache(), 0
            self.forward(ids[:, :keep])
            return True
        for i, layer in self.saved:  # back to the round's start, then run the accepted tokens again
            self.cache.layers[i] = copy.deepcopy(layer)
        for layer in self.cache.layers:
            if not isinstance(layer, StateCacheLayer) and self.length > self.saved_length:
                layer.crop(self.saved_length - self.length)
        self.length = self.saved_length
        if keep > self.length:
            self.forward(ids[:, :keep])
            return True
        return False


def _tally(stats: SpecStats, p: Tensor, q: Tensor, n: int, k: int) -> None:
    """Count one round: n drafted, k accepted (the tested ones run up to the first rejection)."""
    stats.rounds += 1
    tested = min(k + 1, n)
    stats.proposed += n
    stats.tested += tested
    stats.accepted += k
    stats.overlap += float(torch.minimum(p[:tested], q[:tested]).sum()) if tested else 0.0
    stats.accepted_per_round.append(k)


def _extend(kept: Tensor | None, length: int, new: Tensor) -> Tensor:
    return new if kept is None or length == 0 else torch.cat([kept[:length], new])


class _HeadSide:
    """An EAGLE-style draft head (`students.eagle.EagleDraft`) beside its target's `_Side`.

    Head position p reads token p and the target's feature at p - 1 where the target has run
    p - 1, else the head's own prediction of it (drafting). Only positions that read true
    features stay in the head's cache between rounds (`true_length` of them)."""

    def __init__(self, head: torch.nn.Module, target: _Side):
        from transformers import DynamicCache

        self.model, self.target = head.eval(), target
        self.cache = DynamicCache()
        self.length = 0  # positions in the cache
        self.true_length = 0  # of those, the leading ones computed from the target's features
        self.predicted: dict[int, Tensor] = {}  # position -> the head's feature there

    def ready(self, seq: Tensor) -> bool:
        """Whether the target has run everything but the last token (the head needs its features)."""
        return self.target.length >= seq.shape[1] - 1

    def next_logits(self, seq: Tensor) -> Tensor:
        start, end = self.length, seq.shape[1]
        known = self.target.length
        d = self.target.features.shape[-1]
        zero = self.target.features.new_zeros(d)
        prev = torch.stack([self.target.features[p - 1] if 0 < p <= known else
                            (zero if p == 0 else self.predicted[p - 1]) for p in range(start, end)])
        embeds = torch.stack([self.target.embeds[p] if p < known else zero for p in range(start, end)])
        mask = torch.ones(1, end, dtype=torch.long, device=seq.device)
        out = self.model(input_ids=seq[:, start:], attention_mask=mask, prev_features=prev[None],
                         target_embeds=embeds[None], use_cache=True, **{CACHE_KWARG: self.cache})
        self.cache = output_cache(out) or self.cache
        features = out.hidden_states[-1][0]
        for i, p in enumerate(range(start, end)):
            self.predicted[p] = features[i]
        if self.true_length == start and end - 1 <= known:
            self.true_length = end
        self.length = end
        return out.logits[0, -1]

    def prefill(self, ids: Tensor) -> None:
        pass  # the first round catches up

    def save(self) -> None:
        pass

    def rollback(self, ids: Tensor, keep: int) -> bool:
        """Keep the positions computed from true features (the others read drafted ones)."""
        del ids
        self.true_length = min(self.true_length, keep, self.target.length + 1)
        if self.length > self.true_length:
            self.cache.crop(self.true_length - self.length)
            self.length = self.true_length
        self.predicted = {p: f for p, f in self.predicted.items() if p < self.length}
        return False


@torch.no_grad()
def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module, input_ids: Tensor,
                         max_new_tokens: int = 32, gamma: int = 4, temperature: float = 0.0,
                         top_k: int | None = None, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None, stats: SpecStats | None = None,
                         **model_inputs: Any) -> Tensor:
    """Generate up to `max_new_tokens` after `input_ids` (1, n) with `target`'s output
    distribution, `draft` proposing `gamma` tokens per round. `model_inputs` (pixel_values,
    image sizes, ...) go to both models' prefill. Returns the ids (1, n + generated); counts go
    into `stats` when given.

    Raises:
        ValueError: a batch of more than one prompt, a padded prompt, or gamma < 1.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time (batch size 1), got {tuple(input_ids.shape)}")
    mask = model_inputs.pop("attention_mask", None)
    if mask is not None and not bool(mask.all()):
        raise ValueError("speculative decoding takes an unpadded prompt (attention_mask all ones)")
    if gamma < 1:
        raise ValueError(f"gamma must be at least 1, got {gamma}")
    stats = stats if stats is not None else SpecStats()
    greedy = temperature <= 0
    head = getattr(draft, "is_draft_head", False)
    big = _Side(target, model_inputs, keep_hidden=head)
    small = _HeadSide(draft, big) if head else _Side(draft, model_inputs)
    ids, start = input_ids, input_ids.shape[1]
    big.prefill(ids), small.prefill(ids)
    while ids.shape[1] - start < max_new_tokens:
        budget = max_new_tokens - (ids.shape[1] - start)
        n = min(gamma, budget - 1) if budget > 1 else 0  # a round emits at most n + 1 tokens
        if head and not small.ready(ids):  # a prompt that ends in image tokens: the target runs it first
            n = 0
        big.save(), small.save()
        drafted, qs, seq = [], [], ids
        for _ in range(n):
            q = distribution(small.next_logits(seq), temperature, top_k)
            stats.draft_passes += 1
            token = int(q.argmax()) if greedy else _draw(q, generator)
            drafted.append(token)
            qs.append(q)
            seq = torch.cat([seq, seq.new_tensor([[token]])], 1)
        logits = big.forward(seq)[-(n + 1):]
        stats.target_passes += 1
        p = distribution(logits, temperature, top_k)
        q = torch.stack(qs) if qs else p[:0]
        k, nxt = verify(p, q, drafted, greedy, generator)
        _tally(stats, p, q, n, k)
        kept = drafted[:k] + [nxt]
        if eos_token_id is not None and eos_token_id in kept:
            kept = kept[:kept.index(eos_token_id) + 1]
        stats.emitted += len(kept)
        ids = torch.cat([ids, ids.new_tensor([kept])], 1)
        for side in (big, small):  # both caches hold the accepted prefix (the new token is not yet run)
            stats.replay_passes += side.rollback(ids, ids.shape[1] - 1)
        if eos_token_id is not None and kept[-1] == eos_token_id:
            break
    return ids
