"""`workbench compress` and `workbench bench compress`: folders that reload quantized with stock
transformers, per-module footprints, skip lists after conversion, quantization-aware students
converted to the exact weights they trained with, and the quality measures."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_STUDENT, make_tiny_vlm, subprocess_env, tiny_run_args
from torch import nn

import students
from workbench.compress import compress, model_bytes
from workbench.errors import WorkbenchError

WIDE = dict(text_hidden=128, vision_hidden=64)  # up_proj is 512 x 128: per-module ratios are not overhead-bound


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("fp") / "student"
    make_tiny_vlm(processor, **WIDE).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inputs(processor):
    from PIL import Image

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "what color is the circle ?"}]}], add_generation_prompt=True)
    return dict(processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=text, return_tensors="pt"))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _portable(model):
    """bitsandbytes' dequantize-then-matmul path for 4-bit layers, on every CPU: on CPUs with
    AVX512-BF16 its eval-mode default repacks the weights for a bf16 kernel (about 4e-3 off)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("preset, scheme, low, high", [
    ("int8", "int8", 3.7, 4.0),  # 1 byte per weight + one fp32 scale per row
    ("nf4", "nf4", 6.9, 8.0),  # half a byte + one fp32 absmax per 64 (+ the code book)
    ("minicpmv_nf4", "nf4", 7.4, 8.0),  # double quantization: 8-bit absmax
    ("int4", "int4", 3.3, 3.6),  # torchao 0.18 on x86 CPUs stores int4 one value per byte (README)
])
def test_per_module_footprint(model_dir, tmp_path, preset, scheme, low, high):
    report = compress(model_dir, tmp_path / preset, preset=preset)
    model = students.load(tmp_path / preset)
    up = "model.language_model.layers.0.mlp.up_proj"
    ratio = 512 * 128 * 4 / model_bytes(model)["linear"][up]
    assert low < ratio < high, ratio
    row = report["schemes"][scheme]
    assert row["ratio"] > 3.2 and report["bytes"]["quantized"] < report["bytes"]["full"]
    assert (tmp_path / preset / "compress.json").is_file() and (tmp_path / preset / "tokenizer.json").is_file()
    with pytest.raises(WorkbenchError, match="quantized already"):
        compress(tmp_path / preset, tmp_path / "again", preset="int8")


def test_skip_lists_hold_after_conversion(model_dir, tmp_path):
    import bitsandbytes as bnb
    from torchao.utils import TorchAOBaseTensor

    def converted(preset):
        compress(model_dir, tmp_path / preset, preset=preset)
        return students.load(tmp_path / preset)

    nf4 = converted("minicpmv_nf4")
    assert type(nf4.lm_head) is nn.Linear and nf4.lm_head.weight.dtype == torch.float32
    assert type(nf4.model.multi_modal_projector.linear_1) is nn.Linear
    assert type(nf4.model.vision_tower.encoder.layers[0].self_attn.out_proj) is nn.Linear
    assert isinstance(nf4.model.vision_tower.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(nf4.model.language_model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    tiny = converted("tinygptv_int8")
    assert all(type(m) is nn.Linear for m in tiny.model.vision_tower.modules() if isinstance(m, nn.Linear))
    assert isinstance(tiny.model.language_model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    mixed = converted("bluelm_mixed")
    assert type(mixed.model.vision_tower.encoder.layers[0].mlp.fc1.weight).__name__ == "Int8Tensor"
    assert type(mixed.model.multi_modal_projector.linear_2.weight).__name__ == "Int8Tensor"
    assert type(mixed.model.language_model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert not isinstance(mixed.lm_head.weight, TorchAOBaseTensor)
    assert not isinstance(mixed.model.vision_tower.encoder.layers[0].mlp.fc1.bias, TorchAOBaseTensor)


@pytest.mark.parametrize("preset", ["nf4", "bluelm_mixed", pytest.param("int8", marks=pytest.mark.slow),
                                    pytest.param("tinygptv_int8", marks=pytest.mark.slow)])
def test_compressed_folders_reload_with_stock_transformers_and_generate(model_dir, tmp_path, inputs, preset):
    out = tmp_path / preset
    compress(model_dir, out, preset=preset)
    code = (f"import torch, json, sys\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
            f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r})\n"
            f"assert m.config.quantization_config is not None\n"
            f"inputs = {{k: torch.tensor(v) for k, v in json.loads(sys.stdin.read()).items()}}\n"
            f"out = m.generate(**inputs, max_new_tokens=3, do_sample=False)\n"
            # inference under no_grad, as a deployment runs: on CPUs with AVX512-BF16, bitsandbytes
            # 0.50's repacked 4-bit path adds the bias in place, which autograd refuses
            f"with torch.no_grad():\n    logits = m(**inputs).logits\n"
            f"print(json.dumps({{'logits': logits[0, -1].tolist(), 'tokens': out[0].tolist()}}))\n")
    env = {**subprocess_env(), "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps({k: v.tolist() for k, v in inputs.items()}),
                          capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = students.load(out)
    assert torch.allclose(_logits(ours, inputs)[0, -1], torch.tensor(theirs["logits"]), atol=1e-5)
    assert len(theirs["tokens"]) == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_a_quantization_aware_student_converts_to_what_it_trained_with(processor, tmp_path, inputs, method):
    from students.quantize import quantize_transform

    model = make_tiny_vlm(processor, **WIDE)
    quantize_transform(model, method=method, double_quant=method == "nf4")
    model.save_pretrained(tmp_path / "qad")
    processor.save_pretrained(tmp_path / "qad")
    fake = _logits(model, inputs)
    assert torch.equal(_logits(students.load(tmp_path / "qad"), inputs), fake)  # reloads fake-quantized
    report = compress(tmp_path / "qad", tmp_path / "real")  # no flags: the recorded request
    assert report["quantization_aware"] and report["request"]["scopes"] == {"llm": method, "vision": method}
    converted = _logits(_portable(students.load(tmp_path / "real")), inputs)
    assert (converted - fake).abs().max() < 1e-5  # the tolerance the README states
    fast = _logits(students.load(tmp_path / "real"), inputs)  # the CPU's own default kernel
    assert (fast - fake).abs().max() < 2e-2
    config = json.loads((tmp_path / "real" / "config.json").read_text())
    assert "workbench_quantize" not in config and "quantization_config" in config


def test_quality_orders_int8_before_nf4(model_dir, world_dir):
    from workbench.bench.compress import quality
    from workbench.evaluation import held_out_from_path

    held_out = held_out_from_path(str(world_dir / "val.json"), model_dir)
    full = students.load(model_dir).eval()
    same = quality(full, full, held_out.loader(16))
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["agreement"] == 1
    scores = {}
    for preset in ("int8", "nf4"):
        out = world_dir.parent / f"q-{preset}"
        if not out.exists():
            compress(model_dir, out, preset=preset)
        scores[preset] = quality(full, students.load(out), held_out.loader(16))
    assert 0 < scores["int8"]["kl"] < scores["nf4"]["kl"]
    assert scores["int8"]["agreement"] >= 0.95
    assert scores["int8"]["answer_tokens"] == same["answer_tokens"] > 0


@pytest.fixture(scope="module")
def qad_run(tmp_path_factory):
    """A tiny run with the `quantize` transform, through the CLI (in process)."""
    from workbench.cli import main

    root = tmp_path_factory.mktemp("qad")
    args = tiny_run_args(root, "transforms.quantize.method=int4", "transforms.quantize.group_size=16", "name=qad")
    assert main(["run", str(REPO / "experiments/windtunnel/student_kd.yaml"), "teacher=null",
                 "loss={ce: {type: ce}}", *args]) == 0
    return next((root / "runs" / "qad").glob("2*"))


def test_a_qad_run_exports_what_compress_converts_exactly(qad_run, tmp_path):
    from workbench.bench.compress import quality
    from workbench.evaluation import held_out_from_config
    from workbench.config import load_config

    summary = json.loads((qad_run / "summary.json").read_text())
    assert summary["quantize"]["schemes"] == ["int4"] and summary["quantize"]["group_size"] == 16
    report = compress(qad_run, tmp_path / "int4")  # the run's request, no flags
    assert report["quantization_aware"] and report["request"]["group_size"] == 16
    held_out = held_out_from_config(load_config(qad_run / "config.yaml"))
    trained = students.load(qad_run / "student")  # fake-quantized, as it trained
    q = quality(trained, students.load(tmp_path / "int4"), held_out.loader(16))
    assert q["kl"] < 1e-8 and q["agreement"] == 1.0
    assert q["acc"] == pytest.approx(summary["student"]["acc"])


def test_bench_worker_measures_a_compressed_folder(model_dir, tmp_path, inputs):
    from workbench.bench.compress import measure

    compress(model_dir, tmp_path / "nf4", preset="nf4")
    spec = {"threads": 1, "repeats": 1, "new_tokens": 2, "path": str(tmp_path / "nf4"),
            "inputs": {k: v.tolist() for k, v in inputs.items() if k in ("input_ids", "pixel_values")}}
    row = measure(spec)
    full = model_bytes(students.load(model_dir))
    assert row["model_bytes"] < full["total"] and row["linear_bytes"] < sum(full["linear"].values())
    assert row["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0 and row["peak_rss"] >= 0


@pytest.mark.slow
def test_bench_compress_command_writes_one_row_per_variant(qad_run, tmp_path):
    """`workbench bench compress` of a QAD run: full, its own conversion ("trained"), a preset."""
    out = tmp_path / "bench.json"
    bench = subprocess.run([sys.executable, "-m", "workbench.cli", "bench", "compress", str(qad_run), "--presets",
                            "int8", "--repeats", "1", "--new-tokens", "2", "--json", str(out)], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["full", "trained", "int8"]
    assert rows["trained"]["kl"] < 1e-8 and rows["trained"]["agreement"] == 1.0  # conversion = training forward
    assert rows["int8"]["model_bytes"] < rows["full"]["model_bytes"]
    assert all(r["decode_tok_s"] > 0 and r["peak_rss"] >= 0 for r in rows.values())


def test_fused_logits_take_a_fake_quantized_head_and_refuse_a_ternary_one(tmp_path, capsys):
    """trainer.fused_logits multiplies by the head's matrix: a fake-quantized lm_head gives it
    its quantized weight; a ternary one (norm and activation quantization inside) cannot be fused."""
    from losses.divergence import _fused
    from students.quantize import FakeQuantLinear, fake_quantize
    from workbench.cli import main

    torch.manual_seed(0)
    head = FakeQuantLinear.from_linear(nn.Linear(64, 32, bias=False), "int8")
    hidden, targets = torch.randn(5, 64), torch.randint(0, 32, (5,))
    expected = nn.functional.cross_entropy(hidden @ fake_quantize(head.weight, "int8").T, targets)
    zeros = torch.zeros(5, 1)
    loss = _fused(hidden, head, topk_ids=targets[:, None], topk_logp=zeros, rest_logp=torch.full((5,), float("-inf")))
    assert torch.allclose(loss, expected, atol=1e-5)  # CE = forward KL to a one-hot teacher
    code = main(["run", str(REPO / "experiments/windtunnel/student_kd.yaml"), "teacher=null", "loss={ce: {type: ce}}",
                 *tiny_run_args(tmp_path, "trainer.fused_logits=true", "transforms.ternary.quantize_lm_head=true")])
    assert code == 2 and "fused_logits" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---- ternary: a trained ternary student packs exactly; full-precision models ternarise after training


@pytest.fixture(scope="module")
def ternary_run(tmp_path_factory):
    """A tiny run with the `ternary` transform (8-bit activations, BitNet b1.58), through the CLI."""
    from workbench.cli import main

    root = tmp_path_factory.mktemp("ternary")
    args = tiny_run_args(root, "transforms.ternary.act_bits=8", "name=ternary")
    assert main(["run", str(REPO / "experiments/windtunnel/student_kd.yaml"), "teacher=null",
                 "loss={ce: {type: ce}}", *args]) == 0
    return next((root / "runs" / "ternary").glob("2*"))


def test_a_ternary_run_packs_to_what_it_trained_with(ternary_run, tmp_path, capsys):
    from workbench.bench.compress import quality
    from workbench.cli import main
    from workbench.config import load_config
    from workbench.evaluation import held_out_from_config

    assert main(["compress", str(ternary_run), "--out", str(tmp_path / "packed")]) == 0  # no flags: its layers
    assert "ternary against bf16" in capsys.readouterr().out
    report = json.loads((tmp_path / "packed" / "compress.json").read_text())
    assert report["quantization_aware"] and report["request"]["act_bits"] == 8
    # every LLM weight: 2 bits + one fp32 scale per matrix -> just under 8x smaller than bf16
    assert 7.5 < report["bytes"]["linear_bf16_ratio"] < 8.0
    assert (tmp_path / "packed" / "bitlinear.py").is_file() and (tmp_path / "packed" / "tokenizer.json").is_file()
    held_out = held_out_from_config(load_config(ternary_run / "config.yaml"))
    q = quality(students.load(ternary_run / "student"), students.load(tmp_path / "packed"), held_out.loader(16))
    assert q["kl"] == 0.0 and q["agreement"] == 1.0  # the integer path computes the training forward exactly
    summary = json.loads((ternary_run / "summary.json").read_text())
    assert q["acc"] == pytest.approx(summary["student"]["acc"])
    with pytest.raises(WorkbenchError, match="quantized already"):
        compress(tmp_path / "packed", tmp_path / "again")
    with pytest.raises(WorkbenchError, match="ternary student"):
        compress(ternary_run, tmp_path / "int8", preset="int8")


def test_post_training_ternarisation_of_a_full_precision_model(model_dir, tmp_path, inputs):
    report = compress(model_dir, tmp_path / "ptq", method="ternary", group_size=64)
    assert report["layers"] == {"ternary": 14} and not report["quantization_aware"]
    assert report["request"] == {"method": "ternary", "weight_scale": "group:64", "act_bits": None,
                                 "placement": "mmfree"}
    # 2 bits per weight + one fp32 scale per 64 weights = 2.5 bits: 16 / 2.5 = 6.4x smaller than bf16
    assert report["bytes"]["linear_bf16_ratio"] == pytest.approx(6.4, rel=1e-3)
    packed = students.load(tmp_path / "ptq")
    assert "lm_head" in report["kept"] and "model.vision_tower" in report["kept"]
    fp = students.load(model_dir)
    assert 0 < (_logits(packed, inputs) - _logits(fp, inputs)).abs().max() < 10  # changed, still a model


@pytest.mark.slow
def test_bench_compress_of_a_ternary_run_puts_its_packed_form_beside_the_presets(ternary_run, tmp_path):
    """`workbench bench compress TERNARY_RUN --reference FP`: the presets compress the reference."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ternary_run / "student")
    model_dir = tmp_path / "fp"  # a full-precision model of the run's shape and processor
    make_tiny_vlm(processor, **TINY_STUDENT).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    bench = subprocess.run([sys.executable, "-m", "workbench.cli", "bench", "compress", str(ternary_run), "--presets",
                            "int8,ternary", "--reference", str(model_dir), "--repeats", "1", "--new-tokens", "2",
                            "--json", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["full", "source", "trained", "int8", "ternary"]
    # the LLM as 2-bit codes (vision tower, projector and head stay fp32)
    assert rows["trained"]["linear_bytes"] < rows["source"]["linear_bytes"] / 2
    assert rows["trained"]["kl"] > 0 and rows["source"]["kl"] == pytest.approx(rows["trained"]["kl"], abs=1e-9)
    # post-training ternarisation of the reference packs the same layers alike (int8 also takes the vision tower)
    assert rows["ternary"]["linear_bytes"] == rows["trained"]["linear_bytes"] < rows["full"]["linear_bytes"]
    assert rows["int8"]["linear_bytes"] < rows["full"]["linear_bytes"]
    assert all(r["decode_tok_s"] > 0 for r in rows.values())


def test_a_matmul_free_student_packs_through_the_cli(processor, tmp_path, inputs):
    """In a fresh process (nothing registered "mmfree" before the CLI reads the folder): every
    projection and the LM head packed, the same logits."""
    from students.vlm import tiny_mmfree_llava
    from workbench.build.student import processor_fields

    torch.manual_seed(0)
    model = tiny_mmfree_llava(**processor_fields(processor), vision_hidden=32, vision_layers=1, vision_heads=2,
                              text_hidden=64, text_layers=2).eval()
    model.save_pretrained(tmp_path / "mmfree")
    run = subprocess.run([sys.executable, "-m", "workbench.cli", "compress", str(tmp_path / "mmfree"), "--out",
                          str(tmp_path / "packed")], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "packed" / "compress.json").read_text())
    assert report["layers"] == {"ternary": 2 * 6 + 1} and report["bytes"]["linear_bf16_ratio"] > 7.5
    assert torch.equal(_logits(students.load(tmp_path / "packed"), inputs), _logits(model, inputs))
