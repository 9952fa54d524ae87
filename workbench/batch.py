"""The batch contract: what a collated batch holds besides the model's own inputs.

Collators (`workbench/data/`) produce dicts; targets (`workbench/targets/`) add their
teacher signal under their own keys; `model_inputs` keeps what the model's forward takes.
"""

from __future__ import annotations

from typing import Any

# keys that are not model inputs: labels and masks for the loss, ids and question types for
# bookkeeping, and the teacher signals targets add
NON_MODEL_KEYS = ("labels", "image_mask", "ids", "qtypes", "teacher_topk", "teacher_pixel_values")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model's forward takes (timm classifiers take
    the images as `x`)."""
    if "input_ids" not in batch and "pixel_values" in batch:
        return {"x": batch["pixel_values"]}
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
