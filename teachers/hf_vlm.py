"""A frozen Hugging Face VLM teacher: any `AutoModelForImageTextToText` checkpoint.

`workbench/build/teacher.py` creates an `HFVLMTeacher` from `teacher.*` config keys; the online
target (`workbench/targets/online.py`) calls it under no_grad and hands its logits to the
losses; feature taps (`workbench/taps.py`) read what loss terms need from inside `HFVLMTeacher.model`. Optional
8-bit / NF4 loading goes through bitsandbytes and quantizes only the text decoder.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import is_accelerate_available, is_bitsandbytes_available

from students.quantize import NF4_IN_BLOCK, NF4_OUT_BLOCK, fits, outside_decoder
from teachers.errors import TeacherError

_log = logging.getLogger("teachers.hf_vlm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
QUANTIZE = ("none", "int8", "nf4")
# Batch keys that are model inputs in the signature but that a frozen teacher must not get:
# `labels` would make the model compute a loss, the rest are set by `forward` itself.
_RESERVED_KWARGS = {"labels", "output_hidden_states", "output_attentions", "return_dict", "use_cache"}


def nf4_packable(layer: nn.Module) -> bool:
    """Whether bitsandbytes' NF4 CPU kernel can run this Linear layer (see
    `students.quantize.NF4_OUT_BLOCK`); such layers stay unquantized."""
    return fits("nf4", layer, 1) is None


@dataclass
class TeacherOutput:
    """What a teacher forward returns.

    Attributes:
        logits: (B, L, V) float32 next-token logits. Features inside the teacher (hidden
            states, attention queries/keys, vision features) are read by feature taps on
            `HFVLMTeacher.model` (`workbench/taps.py`), not returned here.
    """

    logits: Tensor


class HFVLMTeacher(nn.Module):
    """A frozen wrapper around a Hugging Face image-text-to-text model and its processor.

    The model stays in eval mode (`train()` is a no-op), has no trainable parameters and runs
    under `torch.no_grad()`. With `quantize` set, only the text decoder's Linear layers become
    bitsandbytes layers; the vision tower, projector and lm_head stay in `dtype`.

    Args:
        path: a Hugging Face hub id or a local folder saved with `save_pretrained` (model
            and processor).
        revision: hub branch, tag or commit.
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's dtype).
        quantize: "none", "int8" (LLM.int8) or "nf4" (4-bit NormalFloat); needs
            bitsandbytes and accelerate. NF4 leaves Linear layers whose output / input widths
            are not multiples of 32 / 64 in `dtype` (bitsandbytes' CPU kernel cannot run them),
            lists them in `self.unquantized` and says so in a warning.
        skip_modules: with `quantize`, the modules kept unquantized, replacing the default
            (everything outside the text decoder, e.g. `["lm_head", "model.vision_tower",
            "model.multi_modal_projector"]` for LLaVA). transformers tests each Linear
            layer's full name: an entry matches from the root up to a module boundary
            ("model.vision_tower", not "vision_tower") or as the end of the name ("lm_head",
            "q_proj"). An entry that matches no Linear layer is an error.
        trust_remote_code: allow the checkpoint's own Python code to run (off by default).
    """

    def __init__(
        self,
        path: str,
        revision: str | None = None,
        dtype: str = "float32",
        quantize: str = "none",
        skip_modules: list[str] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        _check_options(dtype, quantize)
        path = _resolve_path(path)
        hub = dict(revision=revision, trust_remote_code=trust_remote_code)
        config = _load(path, AutoConfig.from_pretrained, "config", **hub)
        quantization_config = None
        self.unquantized: list[str] = []  # Linear layers of the decoder that `quantize` had to leave alone
        if quantize != "none":
            skip, self.unquantized = _skip_modules(config, skip_modules, trust_remote_code, quantize)
            quantization_config = _bnb_config(quantize, DTYPES[dtype], skip + self.unquantized)
        self.processor = _load(path, AutoProcessor.from_pretrained, "processor", **hub)
        self.model = _load(
            path, AutoModelForImageTextToText.from_pretrained, "model",
            config=config, dtype=DTYPES[dtype], quantization_config=quantization_config, **hub,
        )
        self.path = path
        self.model.requires_grad_(False)
        self.eval()
        signature = inspect.signature(self.model.forward).parameters.values()
        self._input_names = {p.name for p in signature if p.kind is not p.VAR_KEYWORD} - _RESERVED_KWARGS

    def train(self, mode: bool = True) -> HFVLMTeacher:
        """Stay in eval mode whatever is asked (Lightning calls `.train()` on every child)."""
        return super().train(False)

    @property
    def vocab_size(self) -> int:
        """Size of the logits' last dimension."""
        head = self.model.get_output_embeddings()
        if head is not None:
            return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
        return self.model.config.get_text_config().vocab_size

    @property
    def num_parameters(self) -> int:
        """Parameter count (4-bit weights counted unpacked)."""
        return self.model.num_parameters()

    @property
    def image_token_id(self) -> int | None:
        """The id of the image placeholder token (LLaVA/PaliGemma spell it `image_token_index`)."""
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        return token if token is not None else getattr(config, "image_token_index", None)

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        **extra,
    ) -> TeacherOutput:
        """Run the teacher once.

        Args:
            input_ids: (B, L) token ids with image placeholders already expanded.
            attention_mask: (B, L) 1 for real tokens.
            pixel_values: images as the processor made them, e.g. (B, 3, H, W).
            **extra: other model inputs (e.g. `image_grid_thw`, `mm_token_type_ids`); keys
                that are not inputs of the model's forward (and `labels`) are ignored.

        Returns:
            TeacherOutput with (B, L, V) float32 logits.
        """
        inputs = {k: v for k, v in extra.items() if k in self._input_names}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, **inputs)
        return TeacherOutput(logits=out.logits.float())  # (B, L, V)


# ---- loading -------------------------------------------------------------------------------


def _check_options(dtype: str, quantize: str) -> None:
    if dtype not in DTYPES:
        raise TeacherError(f"teacher.dtype {dtype!r} is not valid; use one of {list(DTYPES)}")
    if quantize not in QUANTIZE:
        raise TeacherError(f"teacher.quantize {quantize!r} is not valid; use one of {list(QUANTIZE)}")
    if quantize != "none" and not (is_bitsandbytes_available() and is_accelerate_available()):
        raise TeacherError(
            f"teacher.quantize={quantize!r} needs bitsandbytes and accelerate: "
            "pip install bitsandbytes accelerate, or set teacher.quantize=none"
        )


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def _resolve_path(path: str) -> str:
    """Check a local checkpoint folder up front; hub ids pass through unchanged."""
    if not _is_local(path):
        return path
    folder = Path(path).expanduser()
    if not folder.exists():
        raise TeacherError(f"teacher.path {path} does not exist; point it at a model folder or a hub id")
    if not folder.is_dir():
        raise TeacherError(f"teacher.path {path} is a file; point it at the folder saved with save_pretrained")
    if not (folder / "config.json").is_file():
        raise TeacherError(
            f"teacher.path {path} has no config.json, so it holds no loadable model; "
            "point it at a folder saved with save_pretrained"
        )
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):  # reads and checks the header only
                pass
        except SafetensorError as e:
            raise TeacherError(
                f"teacher.path {path}: weights file {weights} is corrupt or truncated ({e}); "
                "re-download or re-save the checkpoint"
            ) from e
    return str(folder)


def load_teacher_processor(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The teacher checkpoint's processor alone (no weights), with the same checks as the teacher."""
    path = _resolve_path(path)
    return _load(path, AutoProcessor.from_pretrained, "processor", revision=revision,
                 trust_remote_code=trust_remote_code)


def _load(path: str, loader, what: str, **kwargs):
    """Call a `from_pretrained` and turn its loading failures into a `TeacherError`."""
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _is_local(path):
            fix = "check the folder (save model and processor with save_pretrained)"
        else:
            fix = (
                "it is not a local folder and could not be fetched from the Hugging Face hub "
                "(offline or not cached); download it first or point teacher.path at a local folder"
            )
        raise TeacherError(f"teacher.path {path}: cannot load the {what}: {reason}; {fix}") from e


def _bnb_config(quantize: str, dtype, skip: list[str]) -> BitsAndBytesConfig:
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = torch.float32 if dtype == "auto" else dtype
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip
    )


def _skip_modules(config, skip_modules: list[str] | None, trust_remote_code: bool,
                  quantize: str) -> tuple[list[str], list[str]]:
    """The modules bitsandbytes must leave alone, read off a weightless (meta) copy of the model:
    the asked-for (or default) list, and the Linear layers it cannot quantize (NF4 widths)."""
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    linears = {name: module for name, module in skeleton.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    if skip_modules is None:
        skip = default_skip_modules(skeleton)
    else:
        # bitsandbytes tests the name of each Linear layer, so "vision_tower" (a suffix of the
        # module "model.vision_tower" but of none of its Linear layers) would silently do nothing.
        for pattern in skip_modules:
            if not any(_skip_matches(pattern, name) for name in linears):
                raise TeacherError(
                    f"teacher.skip_modules entry {pattern!r} matches no Linear layer of the model; names match from "
                    f"the root (e.g. {default_skip_modules(skeleton)}) or as the end of a layer name (e.g. 'q_proj')"
                )
        skip = list(skip_modules)
    odd = []
    if quantize == "nf4":
        odd = [name for name, module in linears.items() if isinstance(module, nn.Linear)
               and not nf4_packable(module) and not any(_skip_matches(p, name) for p in skip)]
    if odd:
        _log.warning("teacher.quantize=nf4: %d Linear layer(s) stay unquantized because bitsandbytes' NF4 CPU "
                     "kernel needs output / input widths that are multiples of %d / %d: %s", len(odd),
                     NF4_OUT_BLOCK, NF4_IN_BLOCK, ", ".join(odd))
    return skip, odd


def _skip_matches(pattern: str, name: str) -> bool:
    """transformers' rule for `llm_int8_skip_modules` (`should_convert_module`)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers < 5 matched skip names as substrings
        return pattern in name
    return not should_convert_module(name, [pattern])


def default_skip_modules(model: nn.Module) -> list[str]:
    """Root-anchored names of every parameterised module outside the text decoder, e.g.
    `["lm_head", "model.vision_tower", "model.multi_modal_projector"]` for LLaVA and
    `["lm_head", "model.visual"]` for Qwen2-VL. (transformers' own default keeps only the
    lm_head, so the vision tower and projector would be quantized.)"""
    return outside_decoder(model)
