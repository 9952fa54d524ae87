"""Small LLaVA-style VLM students built from plain arguments.

A student here is an ordinary `transformers.LlavaForConditionalGeneration` (CLIP-style vision
tower -> 2-layer MLP projector -> Llama or Qwen2 decoder), so it saves with
`save_pretrained`, reloads with `AutoModelForImageTextToText.from_pretrained`, and can serve
as a teacher for the next run. Pure model code: no Lightning, no IO.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def tiny_llava(
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    image_size: int = 48,
    patch_size: int = 16,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_model: str = "llama",
    text_hidden: int = 128,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    text_intermediate: int | None = None,
    max_position_embeddings: int = 512,
    vision_feature_layer: int = -1,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    position_init_std: float | None = None,
) -> LlavaForConditionalGeneration:
    """A LLaVA model with a CLIP vision tower and a Llama/Qwen2 decoder.

    Args:
        vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id: from the
            tokenizer the student shares with its teacher (filled in by `workbench/build.py`).
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
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        initializer_range=initializer_range,
    )
    text = TEXT_CONFIGS[text_model](
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=tie_word_embeddings,
    )
    config.pad_token_id = pad_token_id
    config.bos_token_id = bos_token_id
    config.eos_token_id = eos_token_id
    model = LlavaForConditionalGeneration(config)
    # LLaVA reads the tower's hidden states, never its pooled output: the post-layernorm is
    # dead weight, and a trainable parameter without a gradient breaks DDP.
    model.model.vision_tower.post_layernorm.requires_grad_(False)
    if position_init_std is not None:
        nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=position_init_std)
    return model
