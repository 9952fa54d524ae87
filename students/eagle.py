"""An EAGLE-style draft head (docs/methods.md §16): one decoder layer that drafts tokens for a
target model from the target's own last hidden state.

Input at position s is `fc([embed(x_s) ; f_{s-1}])`, where f is the target's final (normed)
hidden state and f_{-1} = 0; the layer and a final norm turn it into a prediction of f_s, and
the *target's* frozen LM head turns that into next-token logits (position s predicts token
s + 1, as a causal LM does). At image positions (MSD's decoupling) the input is the raw visual
embedding the target itself read there, not fused with features. While drafting, positions
whose target feature is not known yet read the head's own predicted feature instead.

The head keeps the target by reference, not as a submodule: its embedding table and LM head
are the target's, frozen, and stay out of this model's weights and checkpoints. Training
(`student.type: eagle_head`) gets f and the target's input embeddings from the online teacher
that is already running (`teacher_reads`); without them the forward runs the target itself.

The decoder layer is the target's own class (`AutoModel` of its text config with one layer),
so rotary positions, attention masks and the KV cache are those of `transformers`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from students.hf_cache import CACHE_KWARG, either_cache, output_cache


class EagleConfig(PretrainedConfig):
    """The draft head's config: the one-layer text config of its target, plus:

    Args:
        feature_noise: EAGLE's training noise on the input features: uniform with this
            amplitude times 512 / sequence length (0: off; MSD's code uses 0.2).
        visual_decoupling: image positions read the raw visual embeddings (MSD).
        image_token_id: the target's image placeholder id (None for a text target).
    """

    model_type = "workbench_eagle"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: Any = None, feature_noise: float = 0.0, visual_decoupling: bool = True,
                 image_token_id: int | None = None, **kwargs: Any):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.feature_noise = feature_noise
        self.visual_decoupling = visual_decoupling
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


def one_layer_config(text_config: PretrainedConfig) -> PretrainedConfig:
    """A copy of a decoder's config with a single layer (per-layer lists cut to their last entry)."""
    text = copy.deepcopy(text_config)
    n = text.num_hidden_layers
    for key, value in vars(text).items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(text, key, value[-1:])
    text.num_hidden_layers = 1
    return text


class EagleDraft(PreTrainedModel):
    """fc (2d -> d) + one decoder layer + norm, reading the target's features; logits through
    the target's LM head. `attach(target)` before use (`from_target` does)."""

    config_class = EagleConfig
    base_model_prefix = "eagle"
    is_draft_head = True
    _supports_sdpa = True

    def __init__(self, config: EagleConfig):
        super().__init__(config)
        d = config.text_config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.model = AutoModel.from_config(config.text_config)
        self.post_init()
        self.model.embed_tokens = None  # the target's table is used (inputs_embeds only)
        self._target: nn.Module | None = None

    @classmethod
    def from_target(cls, target: nn.Module, feature_noise: float = 0.0, visual_decoupling: bool = True,
                    init_layer: int | None = None) -> EagleDraft:
        """A new head for `target` (a causal LM or VLM). `init_layer` copies that decoder layer
        of the target into the head's layer (None: random, as EAGLE); the norm starts as the
        target's final norm."""
        text = target.config.get_text_config()
        config = EagleConfig(one_layer_config(text), feature_noise=feature_noise,
                             visual_decoupling=visual_decoupling,
                             image_token_id=getattr(target.config, "image_token_id", None))
        decoder = target.get_decoder()
        if not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
            raise ValueError(f"a draft head needs a decoder with `layers` and a final `norm`; "
                             f"{type(decoder).__name__} has not both")
        head = cls(config).to(_dtype(target))
        if init_layer is not None:
            if not -len(decoder.layers) <= init_layer < len(decoder.layers):
                raise ValueError(f"init_layer {init_layer} is not a layer of the target ({len(decoder.layers)} layers)")
            head.model.layers[0].load_state_dict(decoder.layers[init_layer].state_dict())
        head.model.norm.load_state_dict(decoder.norm.state_dict())
        head.attach(target)
        return head

    def attach(self, target: nn.Module) -> EagleDraft:
        """Draft for `target` (kept by reference: not a submodule, not saved)."""
        width = target.config.get_text_config().hidden_size
        if width != self.config.text_config.hidden_size:
            raise ValueError(f"the draft head is {self.config.text_config.hidden_size} wide but the target's "
                             f"hidden states are {width}")
        object.__setattr__(self, "_target", target)
        return self

    @property
    def target(self) -> nn.Module:
        if self._target is None:
            raise ValueError("this draft head has no target: call attach(target) first")
        return self._target

    @property
    def teacher_reads(self) -> dict[str, str]:
        """forward keyword -> tap on the target (paths inside it), for a trainer whose teacher is
        the target: its final hidden state and the input of its first decoder layer."""
        names = {id(m): n for n, m in self.target.named_modules()}
        decoder = self.target.get_decoder()
        return {"target_hidden": names[id(decoder.norm)], "target_embeds": f"{names[id(decoder.layers[0])]}:input"}

    def get_output_embeddings(self) -> nn.Module:
        return self.target.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.target.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:  # the target's; nothing to set here
        pass

    @torch.no_grad()
    def target_features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                        **target_inputs: Any) -> tuple[Tensor, Tensor]:
        """(final hidden states, input embeddings) of the target, on this head's device (its base
        model runs: no LM head)."""
        where = next(self.target.parameters()).device
        given = {k: v.to(where) if torch.is_tensor(v) else v for k, v in target_inputs.items()}
        mask = attention_mask.to(where) if attention_mask is not None else None
        out = self.target.base_model(input_ids=input_ids.to(where), attention_mask=mask, output_hidden_states=True,
                                     **given)
        device = input_ids.device
        return out.hidden_states[-1].to(device), out.hidden_states[0].to(device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, target_hidden: Tensor | None = None,
                target_embeds: Tensor | None = None, prev_features: Tensor | None = None,
                past_key_values: Any = None, use_cache: bool = False, logits_to_keep: Any = None,
                cache: Any = None, **target_inputs: Any) -> CausalLMOutputWithPast:
        """Draft logits (B, L, V), position s predicting token s + 1.

        Args:
            input_ids: (B, L) tokens.
            target_hidden: (B, L) x d target final hidden states at the same positions (shifted
                here: position s reads f_{s-1}); run from the target when None and no
                `prev_features` are given.
            target_embeds: (B, L, d) the target's input embeddings (read at image positions).
            prev_features: (B, L, d) the feature each position reads, already aligned (decoding).
            past_key_values / cache, use_cache: the head's own KV cache (either name).
            logits_to_keep: which positions get logits, as `transformers` models take it: an int
                (the last n; 0 = all), a (B, L) bool mask (returns (N, V) rows) or indices.
            target_inputs: pixel_values & co., when the target runs here.
        """
        past_key_values = either_cache(cache, past_key_values)
        if prev_features is None:
            if target_hidden is None:
                target_hidden, target_embeds = self.target_features(input_ids, attention_mask, **target_inputs)
            prev_features = torch.cat([torch.zeros_like(target_hidden[:, :1]), target_hidden[:, :-1]], 1)
        hidden = self.draft_features(input_ids, prev_features, target_embeds, attention_mask, past_key_values,
                                     use_cache)
        logits = self.get_output_embeddings()(_kept(hidden.last_hidden_state, logits_to_keep))
        return CausalLMOutputWithPast(logits=logits, hidden_states=(hidden.last_hidden_state,),
                                      **{CACHE_KWARG: output_cache(hidden)})

    def draft_features(self, input_ids: Tensor, prev_features: Tensor, target_embeds: Tensor | None,
                       attention_mask: Tensor | None, past_key_values: Any, use_cache: bool) -> Any:
        """The decoder's output for fc([embed(x) ; prev]) (image positions: the visual embeddings)."""
        prev = prev_features.to(self.fc.weight.dtype)
        if self.training and self.config.feature_noise > 0:  # EAGLE: U(-a/2, a/2) * 512 / L
            prev = prev + (torch.rand_like(prev) - 0.5) * self.config.feature_noise * 512 / prev.shape[1]
        image = None
        if self.config.image_token_id is not None and target_embeds is not None:
            image = input_ids == self.config.image_token_id
        safe = input_ids.masked_fill(image, 0) if image is not None else input_ids
        embeds = self.get_input_embeddings()(safe).to(prev.dtype)
        if image is not None:
            embeds = torch.where(image[..., None], target_embeds.to(prev.dtype), embeds)
        fused = self.fc(torch.cat([embeds, prev], -1))
        if image is not None and self.config.visual_decoupling:
            fused = torch.where(image[..., None], target_embeds.to(prev.dtype), fused)
        if past_key_values is not None and fused.shape[1] == 1 and use_cache:
            return self._one_token(fused, past_key_values)
        return self.model(inputs_embeds=fused, attention_mask=attention_mask, use_cache=use_cache,
                          **{CACHE_KWARG: past_key_values})

    def _one_token(self, fused: Tensor, cache: Any) -> Any:
        """One drafting step on the cache without the model's generic forward (masks, output
        capture): a single query attends to every cached key, so no mask is needed. On a CPU
        this halves a small head's step time, which is most of what drafting costs."""
        from transformers.modeling_outputs import BaseModelOutputWithPast

        past = cache.get_seq_length()
        position_ids = torch.arange(past, past + 1, device=fused.device)[None]
        rope = self.model.rotary_emb(fused, position_ids=position_ids)
        hidden = fused
        for layer in self.model.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=position_ids,
                           use_cache=True, **{CACHE_KWARG: cache})
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return BaseModelOutputWithPast(last_hidden_state=self.model.norm(hidden), **{CACHE_KWARG: cache})


def _kept(hidden: Tensor, keep: Any) -> Tensor:
    if keep is None or (isinstance(keep, int) and keep == 0):
        return hidden
    if isinstance(keep, int):
        return hidden[:, -keep:]
    if keep.dtype == torch.bool and keep.shape == hidden.shape[:2]:
        return hidden[keep]
    return hidden[:, keep]


def eagle_head(target: nn.Module, feature_noise: float = 0.0, visual_decoupling: bool = True,
               init_layer: int | None = None) -> EagleDraft:
    """`student.type: eagle_head`: a draft head for the run's teacher (see `EagleDraft.from_target`)."""
    return EagleDraft.from_target(target, feature_noise, visual_decoupling, init_layer)


eagle_head.processor_fields = ()  # vocabulary and image tokens are the target's


def load_draft_head(path: Any, target: nn.Module) -> EagleDraft:
    """A saved head (`save_pretrained` folder) attached to `target`."""
    return EagleDraft.from_pretrained(path).to(_dtype(target)).attach(target).eval()


def _dtype(target: nn.Module) -> torch.dtype:
    """The target's floating dtype (its first parameters may be quantized integers)."""
    return next(p.dtype for p in target.parameters() if p.is_floating_point())


def is_draft_head_folder(path: Any) -> bool:
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == EagleConfig.model_type
    except (OSError, ValueError):
        return False
