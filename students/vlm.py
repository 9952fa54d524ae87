"""Small LLaVA-style VLM students built from plain arguments.

A student here is an ordinary `transformers.LlavaForConditionalGeneration` (CLIP-style vision
tower -> 2-layer MLP projector -> Llama or Qwen2 decoder, or the MatMul-free LM of
`students.mmfree`), so it saves with `save_pretrained`, reloads with
`AutoModelForImageTextToText.from_pretrained` (an mmfree one with its ternary head through
`students.load`), and can serve as a teacher for the next run. Pure model
code: no Lightning, no IO.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    Qwen2Config,
)

from students.bitlinear import CONFIG_KEY, restore_ternary
from students.mmfree import MMFreeConfig, ternary_record

TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def vision_tower(vlm: nn.Module) -> nn.Module:
    """The vision encoder inside a Hugging Face VLM (`model.vision_tower`, `vision_model` or
    `visual`, on the VLM or its inner `model`).

    Raises:
        ValueError: the VLM has none of them.
    """
    for owner in (getattr(vlm, "model", None), vlm):
        for name in ("vision_tower", "vision_model", "visual"):
            tower = getattr(owner, name, None) if owner is not None else None
            if isinstance(tower, nn.Module):
                return tower
    raise ValueError(f"cannot find the vision tower of {type(vlm).__name__}")


def freeze_unread(vlm: nn.Module) -> list[str]:
    """Freeze what a LLaVA model never reads: its vision tower's post-layernorm and pooling head
    (LLaVA takes the tower's hidden states). They get no gradient, and a trainable parameter
    without one breaks DDP - also for a student reloaded from its folder, where
    `from_pretrained` makes everything trainable again. Returns the frozen module names; other
    models are left alone."""
    if not isinstance(vlm, LlavaForConditionalGeneration):
        return []
    tower = vision_tower(vlm)
    tower = getattr(tower, "vision_model", tower)
    frozen = []
    for name in ("post_layernorm", "head"):
        unused = getattr(tower, name, None)
        if isinstance(unused, nn.Module) and any(p.requires_grad for p in unused.parameters()):
            unused.requires_grad_(False)
            frozen.append(name)
    return frozen


def tiny_llava(*, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None = None,
               eos_token_id: int | None = None, image_size: int = 48, patch_size: int = 16, vision_hidden: int = 64,
               vision_layers: int = 2, vision_heads: int = 4, text_model: str = "llama", text_hidden: int = 128,
               text_layers: int = 4, text_heads: int = 4, text_kv_heads: int | None = None,
               text_intermediate: int | None = None, max_position_embeddings: int = 512,
               vision_feature_layer: int = -1, tie_word_embeddings: bool = False, initializer_range: float = 0.02,
               position_init_std: float | None = None) -> LlavaForConditionalGeneration:
    """A LLaVA model with a CLIP vision tower and a Llama/Qwen2 decoder.

    Args:
        vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id: from the
            tokenizer the student shares with its teacher (filled in by `workbench/build/student.py`).
        image_size, patch_size: from the image processor; the tower yields
            (image_size / patch_size)^2 image tokens (its CLS token is dropped).
        vision_*: width, depth and heads of the CLIP vision tower (MLP 4x width).
        text_model: "llama" or "qwen2".
        text_*: width, depth, heads, KV heads (GQA; default = heads) and MLP width
            (default 4x width) of the decoder.
        vision_feature_layer: which tower layer feeds the projector (-1 = last).
        initializer_range: std of the normal init of the decoder's and tower's Linear and
            embedding weights.
        position_init_std: std of the tower's position embeddings (default: as above). A
            tiny tower whose position embeddings start much smaller than its patch
            embeddings learns slowly *where* an image token is.
    """
    if text_model not in TEXT_CONFIGS:
        raise ValueError(f"text_model must be one of {sorted(TEXT_CONFIGS)}, got {text_model!r}")
    text = TEXT_CONFIGS[text_model](
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate or 4 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range)
    return llava_around(text, image_token_id=image_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                        eos_token_id=eos_token_id, image_size=image_size, patch_size=patch_size,
                        vision_hidden=vision_hidden, vision_layers=vision_layers, vision_heads=vision_heads,
                        vision_feature_layer=vision_feature_layer, tie_word_embeddings=tie_word_embeddings,
                        initializer_range=initializer_range, position_init_std=position_init_std)


def tiny_mmfree_llava(*, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None = None,
                      eos_token_id: int | None = None, image_size: int = 48, patch_size: int = 16,
                      vision_hidden: int = 64, vision_layers: int = 2, vision_heads: int = 4, text_hidden: int = 128,
                      text_layers: int = 4, act_bits: int | None = 8, weight_scale: str = "tensor",
                      initializer_range: float = 0.02, position_init_std: float | None = None,
                      quantize_lm_head: bool = True) -> LlavaForConditionalGeneration:
    """A LLaVA student whose language model is a MatMul-free LM (`MMFreeModel`): CLIP vision
    tower -> 2-layer MLP projector -> MLGRU/GLU blocks -> LM head (a ternary BitLinear when
    `quantize_lm_head`, recorded with the other ternary layers in the config: `students.load`
    rebuilds it and `workbench compress` packs them all).

    Args:
        vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id, image_size,
            patch_size: from the processor the student shares with its teacher.
        vision_*: the CLIP tower, as `tiny_llava`.
        text_hidden, text_layers: width and depth of the MatMul-free LM (GLU width from the
            8/3 rule).
        act_bits, weight_scale: the BitLinears' activation bits and weight scales.
        initializer_range: std of the normal inits (the mixer's projections are xavier).
        position_init_std: std of the tower's position embeddings (default: initializer_range).
    """
    text = MMFreeConfig(vocab_size=vocab_size, hidden_size=text_hidden, num_hidden_layers=text_layers,
                        act_bits=act_bits, weight_scale=weight_scale, quantize_lm_head=quantize_lm_head,
                        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                        tie_word_embeddings=False, initializer_range=initializer_range)
    model = llava_around(text, image_token_id=image_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, image_size=image_size, patch_size=patch_size,
                         vision_hidden=vision_hidden, vision_layers=vision_layers, vision_heads=vision_heads,
                         initializer_range=initializer_range, position_init_std=position_init_std)
    if quantize_lm_head:  # matmulfreellm's ternary head, recorded so a reload (and compress) remakes it
        spec = ternary_record(model, weight_scale, act_bits)
        restore_ternary(model, {**spec, "layers": {"lm_head": "inside"}})
        setattr(model.config, CONFIG_KEY, spec)
    return model


def llava_around(text: PreTrainedConfig, *, image_token_id: int, pad_token_id: int, bos_token_id: int | None,
                 eos_token_id: int | None, image_size: int, patch_size: int, vision_hidden: int, vision_layers: int,
                 vision_heads: int, vision_feature_layer: int = -1, tie_word_embeddings: bool = False,
                 initializer_range: float = 0.02,
                 position_init_std: float | None = None) -> LlavaForConditionalGeneration:
    """A LLaVA model with a fresh CLIP vision tower (MLP 4x width) around the language model
    `text` describes (any config `AutoModel` knows: Llama, Qwen2, `students.mmfree`'s ...);
    the arguments are `tiny_llava`'s."""
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
                              initializer_range=initializer_range)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=vision_feature_layer, tie_word_embeddings=tie_word_embeddings)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    model = LlavaForConditionalGeneration(config)
    freeze_unread(model)
    if position_init_std is not None:
        nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=position_init_std)
    return model


def llava_from_parts(*, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None = None,
                     eos_token_id: int | None = None, image_size: int, patch_size: int, vision_model: str,
                     language_model: str, vision_feature_layer: int = -2, vision_feature_select_strategy: str = "full",
                     projector_hidden_act: str = "gelu") -> LlavaForConditionalGeneration:
    """A LLaVA student assembled from a pretrained vision encoder and a pretrained causal LM,
    joined by a fresh 2-layer MLP projector (LLaVA-KD's students: SigLIP + Qwen1.5-0.5B/1.8B).

    Args:
        vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id, image_size,
            patch_size: from the processor the student shares with its teacher (filled in by
            `workbench/build/student.py`); the LM's embeddings grow to `vocab_size` if the tokenizer
            has more tokens (e.g. an added image token).
        vision_model: folder or hub id of a vision encoder checkpoint (a full CLIP/SigLIP
            model or its vision tower alone) or of a VLM; only the vision tower is kept.
        language_model: folder or hub id of an `AutoModelForCausalLM` checkpoint (Qwen2,
            Llama, ...) or of a VLM, whose language model and head are taken.
        vision_feature_layer: tower layer feeding the projector (-2: the penultimate, as
            LLaVA and TinyLLaVA use).
        vision_feature_select_strategy: "full" keeps every patch token (SigLIP has no CLS),
            "default" drops the first (CLIP's CLS).
        projector_hidden_act: activation between the projector's two Linear layers.
    Raises:
        ValueError: the encoder's image or patch size differs from the processor's, or a VLM
            `vision_model` has no vision tower.
        StudentLoadError: a model folder is unreadable.
    """
    tower = _pretrained_tower(vision_model, image_size, patch_size)
    lm = _pretrained_causal_lm(language_model, vocab_size)
    text_config = lm.config
    text_config.pad_token_id, text_config.bos_token_id, text_config.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    n_tokens = (image_size // patch_size) ** 2  # CLIP's CLS, if any, is dropped by the "default" strategy
    llava_config = LlavaConfig(
        vision_config=tower.config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=n_tokens, vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer, projector_hidden_act=projector_hidden_act,
        tie_word_embeddings=text_config.tie_word_embeddings)
    llava_config.pad_token_id, llava_config.bos_token_id, llava_config.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    model = LlavaForConditionalGeneration(llava_config)
    model.model.vision_tower = tower
    model.model.language_model = lm.get_decoder()
    model.lm_head = lm.get_output_embeddings()
    if text_config.tie_word_embeddings:
        model.tie_weights()
    freeze_unread(model)
    return model.to(lm.dtype)


def _pretrained_tower(vision_model: str, image_size: int, patch_size: int) -> nn.Module:
    """The vision tower of a CLIP / SigLIP checkpoint, a bare vision model or a VLM, checked
    against the processor's image and patch size."""
    from transformers import AutoConfig, AutoModel

    from students.loading import load

    config = AutoConfig.from_pretrained(vision_model)
    vision_config = getattr(config, "vision_config", config)
    if (vision_config.image_size, vision_config.patch_size) != (image_size, patch_size):
        raise ValueError(
            f"vision_model {vision_model} takes {vision_config.image_size}px images in {vision_config.patch_size}px "
            f"patches but the processor makes {image_size}px / {patch_size}px; use the teacher's vision encoder size"
        )
    if config.model_type in ("clip", "siglip", "siglip2") or vision_config is config:
        tower_cls = type(AutoModel.from_config(vision_config))
        return tower_cls.from_pretrained(vision_model, config=vision_config)  # a full CLIP/SigLIP keeps its tower only
    return vision_tower(load(vision_model))  # a VLM: its vision tower


def _pretrained_causal_lm(language_model: str, vocab_size: int) -> nn.Module:
    """A causal LM around the decoder and head of `language_model` (a causal LM or a VLM),
    its embeddings grown to `vocab_size` if the tokenizer has more tokens."""
    from transformers import AutoModelForCausalLM

    from students.loading import load_language_model

    decoder, head, text_config = load_language_model(language_model)
    lm = AutoModelForCausalLM.from_config(text_config)
    lm.model, lm.lm_head = decoder, head
    if lm.get_input_embeddings().weight.shape[0] < vocab_size:
        lm.resize_token_embeddings(vocab_size)
    return lm
