"""HFVLMTeacher on a tiny saved LLaVA: parity with plain transformers, frozen-ness, feature
taps, 8-bit / NF4 loading through bitsandbytes on CPU, and the user-facing load errors."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import make_tiny_vlm
from transformers import AutoModelForImageTextToText

import teachers.hf_vlm as hf_vlm
from teachers import HFVLMTeacher, TeacherOutput
from teachers.hf_vlm import nf4_packable
from workbench.data.llava import IGNORE_INDEX, LlavaDataset, VLMCollator
from teachers.errors import TeacherError

bnb = pytest.importorskip("bitsandbytes")
# bitsandbytes' CPU int8 matmul says once per layer that it casts fp32 inputs to fp16.
quiet_bnb = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


@pytest.fixture(scope="module")
def teacher(tiny_vlm_dir):
    return HFVLMTeacher(str(tiny_vlm_dir))


@pytest.fixture(scope="module")
def hf_model(tiny_vlm_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()


@pytest.fixture(scope="module")
def batch(world_dir, teacher):
    data = LlavaDataset(world_dir / "train.json", limit=8)
    return VLMCollator(teacher.processor)([data[i] for i in range(len(data))])


@pytest.fixture(scope="module")
def inputs(batch):
    return {k: batch[k] for k in MODEL_INPUTS}


@pytest.fixture(scope="module")
def int8_teacher(tiny_vlm_dir):
    return HFVLMTeacher(str(tiny_vlm_dir), quantize="int8")


def hf_forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def test_logits_match_transformers(teacher, hf_model, batch, inputs):
    out = teacher(**batch)  # the whole collated batch: labels, ids, qtypes, image_mask are ignored
    assert isinstance(out, TeacherOutput)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (*batch["input_ids"].shape, teacher.vocab_size)
    torch.testing.assert_close(out.logits, hf_forward(hf_model, inputs).logits)


def test_frozen_and_no_graph(teacher, inputs):
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    with torch.enable_grad():
        logits = teacher(**inputs).logits
    assert logits.requires_grad is False and logits.grad_fn is None


def test_properties(teacher, hf_model, processor):
    assert teacher.vocab_size == len(processor.tokenizer) == hf_model.lm_head.out_features
    assert teacher.num_parameters == sum(p.numel() for p in hf_model.parameters())
    assert teacher.image_token_id == processor.image_token_id


def test_taps_on_the_wrapped_model_read_its_hidden_states(teacher, hf_model, inputs):
    from workbench.taps import FeatureTaps, TapPoint

    points = [TapPoint("model.language_model.layers.0"), TapPoint("model.language_model.layers.1")]
    with FeatureTaps(teacher.model, points, "teacher").capture() as found:
        teacher(**inputs)
    ref = hf_forward(hf_model, inputs, output_hidden_states=True).hidden_states  # 0 = embeddings
    torch.testing.assert_close(found[points[0]], ref[1])
    assert found[points[1]].grad_fn is None  # captured under the teacher's no_grad


def test_default_skip_list_keeps_vision_side_unquantized(teacher):
    skip = hf_vlm.default_skip_modules(teacher.model)
    assert sorted(skip) == ["lm_head", "model.multi_modal_projector", "model.vision_tower"]


def linear_kinds(model: nn.Module) -> dict[str, set[type]]:
    """Linear layer classes by part of a LLaVA: decoder, vision side, lm_head."""
    kinds = {"decoder": set(), "vision": set(), "lm_head": set()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            part = "decoder" if ".language_model." in name else "lm_head" if name == "lm_head" else "vision"
            kinds[part].add(type(module))
    return kinds


@quiet_bnb
def test_int8_quantizes_only_the_decoder(int8_teacher):
    kinds = linear_kinds(int8_teacher.model)
    assert kinds == {"decoder": {bnb.nn.Linear8bitLt}, "vision": {nn.Linear}, "lm_head": {nn.Linear}}
    assert all(not p.requires_grad for p in int8_teacher.parameters())


@quiet_bnb
def test_int8_agrees_with_fp32(int8_teacher, teacher, batch, inputs):
    answers = batch["labels"][:, 1:] != IGNORE_INDEX  # positions that predict an answer token
    ref = teacher(**inputs).logits[:, :-1][answers]  # (N, V)
    q = int8_teacher(**inputs).logits[:, :-1][answers]
    top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean()
    kl = F.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    # measured on this batch (89 answer positions): top-1 agreement 1.0, KL 4.9e-7
    # (NF4 on the same batch: 0.83 and 5.0e-4)
    assert top1 >= 0.9
    assert kl <= 1e-4


@pytest.fixture(scope="module")
def nf4_vlm_dir(tmp_path_factory, processor):
    """A tiny LLaVA whose decoder is 64 wide with a 160-wide MLP: every Linear layer but
    down_proj (160 inputs, not a multiple of bitsandbytes' 64-input NF4 block) can be NF4."""
    path = tmp_path_factory.mktemp("nf4_vlm") / "model"
    make_tiny_vlm(processor, seed=0, text_hidden=64, text_intermediate=160, text_layers=2).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def decoder_linears(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()
            if ".language_model." in name and isinstance(m, (nn.Linear, bnb.nn.Linear4bit))}


def test_nf4_loads_and_runs(nf4_vlm_dir, inputs, caplog):
    with caplog.at_level("WARNING", logger="teachers.hf_vlm"):
        nf4 = HFVLMTeacher(str(nf4_vlm_dir), quantize="nf4")
    full = HFVLMTeacher(str(nf4_vlm_dir))
    odd = sorted(name for name, m in full.model.named_modules() if name.endswith("down_proj"))
    assert len(odd) == 2 and not any(nf4_packable(m) for m in map(full.model.get_submodule, odd))
    assert sorted(nf4.unquantized) == odd
    assert "2 Linear layer(s) stay unquantized" in caplog.text and all(name in caplog.text for name in odd)
    kinds = decoder_linears(nf4.model)
    assert {kinds[name] for name in odd} == {nn.Linear}
    assert {kind for name, kind in kinds.items() if name not in odd} == {bnb.nn.Linear4bit} and len(kinds) == 14
    assert {k: v for k, v in linear_kinds(nf4.model).items() if k != "decoder"} == {"vision": {nn.Linear},
                                                                                     "lm_head": {nn.Linear}}
    logits = nf4(**inputs).logits
    assert torch.isfinite(logits).all()
    # 4-bit weights on a random tiny model move the logits a lot (DESIGN §6): bound the shift
    # of the distribution, not the values
    kl = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(full(**inputs).logits, -1),
                  log_target=True, reduction="none").sum(-1)
    assert kl.mean().item() < 0.5


@quiet_bnb
def test_nf4_and_int8_take_layers_skipped_by_name_as_they_are(nf4_vlm_dir, tiny_vlm_dir, inputs):
    skip = ["lm_head", "model.vision_tower", "model.multi_modal_projector", "down_proj"]
    nf4 = HFVLMTeacher(str(nf4_vlm_dir), quantize="nf4", skip_modules=skip)
    assert nf4.unquantized == [] and torch.isfinite(nf4(**inputs).logits).all()
    # a 48-wide decoder: no layer fits the NF4 CPU kernel; LLM.int8 takes any width
    assert len(HFVLMTeacher(str(tiny_vlm_dir), quantize="nf4").unquantized) == 2 * 7
    assert HFVLMTeacher(str(tiny_vlm_dir), quantize="int8").unquantized == []


@pytest.fixture
def broken_copy(tiny_vlm_dir, tmp_path):
    """A copy of the tiny checkpoint folder to damage."""
    return shutil.copytree(tiny_vlm_dir, tmp_path / "copy")


def test_error_missing_local_path(tmp_path):
    for path in (str(tmp_path / "nope"), "./no/such/teacher", "~/no-such-teacher"):
        with pytest.raises(TeacherError, match="does not exist") as err:
            HFVLMTeacher(path)
        assert path in str(err.value)


def test_error_folder_without_config(broken_copy):
    (broken_copy / "config.json").unlink()
    with pytest.raises(TeacherError, match="config.json") as err:
        HFVLMTeacher(str(broken_copy))
    assert str(broken_copy) in str(err.value)


def test_error_truncated_weights(broken_copy):
    weights = broken_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TeacherError, match="truncated") as err:
        HFVLMTeacher(str(broken_copy))
    assert str(weights) in str(err.value)


def test_error_folder_without_processor(broken_copy):
    for f in broken_copy.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    with pytest.raises(TeacherError, match="processor") as err:
        HFVLMTeacher(str(broken_copy))
    assert str(broken_copy) in str(err.value)


def test_error_hub_id_offline():
    with pytest.raises(TeacherError, match="hub") as err:
        HFVLMTeacher("distill-workbench-tests/no-such-model")
    assert "distill-workbench-tests/no-such-model" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, needle", [(dict(quantize="int4"), "'int4'.*'nf4'"), (dict(dtype="fp8"), "'fp8'.*'bfloat16'")]
)
def test_error_unknown_option(tiny_vlm_dir, kwargs, needle):
    with pytest.raises(TeacherError, match=needle):
        HFVLMTeacher(str(tiny_vlm_dir), **kwargs)


def test_error_quantize_without_bitsandbytes(tiny_vlm_dir, monkeypatch):
    monkeypatch.setattr(hf_vlm, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(TeacherError, match="'nf4'.*bitsandbytes"):
        HFVLMTeacher(str(tiny_vlm_dir), quantize="nf4")
