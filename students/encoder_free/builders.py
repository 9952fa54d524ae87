"""Registry builders of encoder-free students: `eve_student` (EVE v1) and `breen_student`
(BREEN), each a plain-argument function that returns an `EncoderFreeForConditionalGeneration`
around a random decoder or a pretrained language model (loaded with `students.loading`).
They live apart from the model code because they load models: the loader imports the model
module, never this one.
"""

from __future__ import annotations

import copy

from students.encoder_free.configuration_encoder_free import EncoderFreeConfig
from students.encoder_free.modeling_encoder_free import EncoderFreeForConditionalGeneration, add_image_experts
from students.loading import load_language_model
from students.vlm import TEXT_CONFIGS


def _encoder_free(*, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None,
                  eos_token_id: int | None, tokenizer: str, language_model: str | None, text_model: str,
                  text_hidden: int, text_layers: int, text_heads: int, text_kv_heads: int | None,
                  text_intermediate: int | None, vision_width: int, patch_size: int, pool: int, heads: int,
                  max_image_side: int, query_grids: list | None, image_experts: bool, tie_word_embeddings: bool,
                  initializer_range: float) -> EncoderFreeForConditionalGeneration:
    decoder = head = None
    if language_model is not None:
        decoder, head, text = load_language_model(language_model)
        text = copy.deepcopy(text)
        tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
    else:
        if text_model not in TEXT_CONFIGS:
            raise ValueError(f"text_model must be one of {sorted(TEXT_CONFIGS)}, got {text_model!r}")
        text = TEXT_CONFIGS[text_model](
            vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate or 4 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=text_heads,
            num_key_value_heads=text_kv_heads or text_heads, tie_word_embeddings=tie_word_embeddings,
            initializer_range=initializer_range)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    config = EncoderFreeConfig(text_config=text, tokenizer=tokenizer, vision_width=vision_width, patch_size=patch_size,
                               pool=pool, heads=heads, max_image_side=max_image_side, image_token_id=image_token_id,
                               query_grids=query_grids, image_experts=False, tie_word_embeddings=tie_word_embeddings)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    model = EncoderFreeForConditionalGeneration(config)
    if decoder is not None:  # the pretrained LLM, as EVE starts from Vicuna and BREEN from Qwen2.5
        model.model.language_model, model.lm_head = decoder, head
        if tie_word_embeddings:
            model.tie_weights()
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
            model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    if image_experts:  # copies of the (pretrained) FFNs
        add_image_experts(model.model.language_model)
        model.config.image_experts = True
    return model


def eve_student(*, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None = None,
                eos_token_id: int | None = None, language_model: str | None = None, text_model: str = "llama",
                text_hidden: int = 128, text_layers: int = 4, text_heads: int = 4, text_kv_heads: int | None = None,
                text_intermediate: int | None = None, vision_width: int = 1024, patch_size: int = 14, pool: int = 2,
                heads: int = 8, max_image_side: int = 672, tie_word_embeddings: bool = False,
                initializer_range: float = 0.02) -> EncoderFreeForConditionalGeneration:
    """An EVE v1 student: EVE's patch tokenizer (conv, local-attention cells, CLS, row split
    tokens, mlp2x_gelu projector) in front of a decoder LM.

    Args:
        vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id: from the processor
            (filled in by `workbench/build/student.py`).
        language_model: folder or hub id of the LLM to start from: a causal LM, or a VLM whose
            language model and head are taken (EVE: Vicuna-7B). Without it a random `text_model`
            decoder of the `text_*` size is built.
        vision_width, patch_size, pool, heads: the tokenizer (EVE: 1024, 14, 2, 8).
        max_image_side: the processor's longest side (EVE: 672, at most 24 x 24 cells).
    """
    return _encoder_free(vocab_size=vocab_size, image_token_id=image_token_id, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, tokenizer="eve",
                         language_model=language_model, text_model=text_model, text_hidden=text_hidden,
                         text_layers=text_layers, text_heads=text_heads, text_kv_heads=text_kv_heads,
                         text_intermediate=text_intermediate, vision_width=vision_width, patch_size=patch_size,
                         pool=pool, heads=heads, max_image_side=max_image_side, query_grids=None,
                         image_experts=False, tie_word_embeddings=tie_word_embeddings,
                         initializer_range=initializer_range)


def breen_student(*, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, language_model: str | None = None, text_model: str = "qwen2",
                  text_hidden: int = 128, text_layers: int = 4, text_heads: int = 4, text_kv_heads: int | None = None,
                  text_intermediate: int | None = None, vision_width: int = 1024, patch_size: int = 14,
                  pool: int = 2, max_image_side: int = 672, query_grids: list | None = None,
                  image_experts: bool = True, tie_word_embeddings: bool = False,
                  initializer_range: float = 0.02) -> EncoderFreeForConditionalGeneration:
    """A BREEN student: the linear patch tokenizer, learnable queries after each image (one
    group per target grid, default [[8, 8], [6, 6]] = 64 + 36, BREEN's strides 3 and 4 of
    CLIP's 24 x 24 grid) and an image expert in every decoder layer.

    Args: as `eve_student` (BREEN starts from Qwen2.5-7B-Instruct); `query_grids` sets the
        query groups, `image_experts` the duplicated FFNs.
    """
    return _encoder_free(vocab_size=vocab_size, image_token_id=image_token_id, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, tokenizer="linear",
                         language_model=language_model, text_model=text_model, text_hidden=text_hidden,
                         text_layers=text_layers, text_heads=text_heads, text_kv_heads=text_kv_heads,
                         text_intermediate=text_intermediate, vision_width=vision_width, patch_size=patch_size,
                         pool=pool, heads=8, max_image_side=max_image_side,
                         query_grids=[[8, 8], [6, 6]] if query_grids is None else query_grids,
                         image_experts=image_experts, tie_word_embeddings=tie_word_embeddings,
                         initializer_range=initializer_range)


# the builders take the tokenizer's ids from the processor; image size and patches are their own
eve_student.processor_fields = breen_student.processor_fields = (
    "vocab_size", "image_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
