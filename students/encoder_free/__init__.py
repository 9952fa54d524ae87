"""Encoder-free VLM students (EVE v1, BREEN; docs/methods.md §6-§7), split as Hugging Face splits
a model family: `configuration_encoder_free` (config + image-layout arithmetic),
`processing_encoder_free` (any-aspect-ratio processor), `modeling_encoder_free` (tokenizers,
image experts, patch-aligning layer, the model) and `builders` (the registry's `eve_student` /
`breen_student`). Importing the package registers the config, model, processor and image
processor with the transformers Auto classes, once.
"""

from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                          AutoProcessor)

from students.encoder_free.builders import breen_student, eve_student
from students.encoder_free.configuration_encoder_free import (TOKENIZERS, EncoderFreeConfig, cell_grid,
                                                               eve_token_count, image_token_count)
from students.encoder_free.modeling_encoder_free import (EncoderFreeBackbone, EncoderFreeForConditionalGeneration,
                                                          EVEPatchTokenizer, ImageExpertMLP, LinearPatchTokenizer,
                                                          PatchAligningLayer, add_image_experts, aligned_layers,
                                                          cell_positions, grids_from_mask, image_runs,
                                                          route_image_tokens)
from students.encoder_free.processing_encoder_free import EncoderFreeImageProcessor, EncoderFreeProcessor

AutoConfig.register(EncoderFreeConfig.model_type, EncoderFreeConfig, exist_ok=True)
AutoModel.register(EncoderFreeConfig, EncoderFreeForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(EncoderFreeConfig, EncoderFreeForConditionalGeneration, exist_ok=True)
# the image processor needs neither backend of its own (PIL + torch): one class for both names
AutoImageProcessor.register(EncoderFreeConfig, image_processor_classes={"pil": EncoderFreeImageProcessor,
                                                                  "torchvision": EncoderFreeImageProcessor},
                            exist_ok=True)
AutoProcessor.register(EncoderFreeConfig, EncoderFreeProcessor, exist_ok=True)

__all__ = [
    "TOKENIZERS", "EVEPatchTokenizer", "EncoderFreeBackbone", "EncoderFreeConfig",
    "EncoderFreeForConditionalGeneration", "EncoderFreeImageProcessor", "EncoderFreeProcessor", "ImageExpertMLP",
    "LinearPatchTokenizer", "PatchAligningLayer", "add_image_experts", "aligned_layers", "breen_student",
    "cell_grid", "cell_positions", "eve_student", "eve_token_count", "grids_from_mask", "image_runs",
    "image_token_count", "route_image_tokens",
]
