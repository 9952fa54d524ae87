"""The typed config (defaults <- YAML with `base:` <- dotlist), its error messages, the
registries' argument checks, and the LR schedules / AdamW parameter groups in optim.py.
Cheap: nothing here builds a model from a config."""

import math
import inspect
from pathlib import Path

import pytest
import yaml
from torch import nn

from workbench.config import OptimConfig, RunConfig, load_config, merge_config, stage_configs, to_yaml
from workbench.errors import WorkbenchError
from workbench.optim import lr_multiplier, make_optimizer, param_groups
from workbench.registry import DATASETS, LOSSES, STUDENTS, TEACHERS
from conftest import REPO

TEACHERS_GET = TEACHERS.get

SHIPPED = sorted((REPO / "experiments").rglob("*.yaml"))
KD_RECIPE = REPO / "experiments" / "windtunnel" / "student_kd.yaml"
TEACHER_RECIPE = REPO / "experiments" / "windtunnel" / "teacher.yaml"


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(WorkbenchError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ---- shipped recipes ------------------------------------------------------------------------


def test_experiments_folder_has_recipes():
    assert KD_RECIPE in SHIPPED and TEACHER_RECIPE in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw.get("name", cfg.name) and cfg.name != RunConfig().name  # the YAML was applied
    stages = [s for _, s in stage_configs(cfg)] if cfg.stages else [cfg]
    assert all(s.loss for s in stages), "a recipe (or stage) without loss terms cannot train"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_yaml_binds_to_the_builders(path):
    """Each stage's student kwargs, teacher keys, loss terms and transforms fit the signatures
    of what they name: a recipe that loads but names an argument a builder lost fails here."""
    import timm

    import students.minivit  # noqa: F401 - registers the MiniViT models with timm
    from workbench.build.loss import build_term
    from workbench.build.student import requested_transforms
    from workbench.build.teacher import teacher_arguments
    from workbench.registry import TRANSFORMS

    cfg = load_config(path)
    for stage in [s for _, s in stage_configs(cfg)] if cfg.stages else [cfg]:
        if stage.student.path is None:
            if stage.student.type in STUDENTS.names():
                STUDENTS.check_kwargs(stage.student.type, stage.student.kwargs, "student.kwargs")
            else:  # image classification: a timm architecture
                assert timm.is_model(stage.student.type), stage.student.type
        if stage.teacher is not None:
            assert set(teacher_arguments(stage.teacher)) <= set(inspect.signature(
                TEACHERS_GET(stage.teacher.type)).parameters)
        for name, term in stage.loss.items():
            assert build_term(name, term) is not None
        for name, options in requested_transforms(stage).items():
            TRANSFORMS.check_kwargs(name, options, name)


# ---- base: inheritance --------------------------------------------------------------------


def test_base_child_overrides_one_key_and_inherits_the_rest(tmp_path):
    parent = write(tmp_path / "parent.yaml", {
        "name": "parent", "seed": 3, "teacher": None,
        "loss": {"ce": {"type": "ce"}},
        "data": {"type": "windtunnel", "batch_size": 8},
        "optim": {"lr": 5e-4, "warmup_steps": 7, "schedule": "wsd"},
    })
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml", {"base": "../parent.yaml", "optim": {"lr": 2e-4}})
    p, c = load_config(parent), load_config(child)
    assert c.optim.lr == 2e-4 and p.optim.lr == 5e-4
    assert c.optim.warmup_steps == 7 and c.optim.schedule == "wsd"  # siblings of the overridden key
    assert (c.name, c.seed, c.data.batch_size, c.data.type) == ("parent", 3, 8, "windtunnel")
    assert list(c.loss) == ["ce"] and c.teacher is None


def test_base_chain_of_three_and_null_override(tmp_path):
    write(tmp_path / "a.yaml", {"name": "a", "teacher": {"path": "/t"}, "loss": {"ce": {"type": "ce"}},
                                "data": {"type": "windtunnel"}, "trainer": {"max_steps": 10}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "trainer": {"val_every_n_steps": 5}})
    c = load_config(write(tmp_path / "c.yaml", {"base": "b.yaml", "teacher": None, "name": "c"}))
    assert c.name == "c" and c.teacher is None
    assert (c.trainer.max_steps, c.trainer.val_every_n_steps) == (10, 5)


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml", "name": "a"})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "name": "b"})
    msg = error_of(tmp_path / "a.yaml")
    assert "loop" in msg and "a.yaml" in msg
    assert "loop" in error_of(write(tmp_path / "self.yaml", {"base": "self.yaml"}))


def test_missing_base_names_the_file(tmp_path):
    msg = error_of(write(tmp_path / "c.yaml", {"base": "nope.yaml", "name": "c"}))
    assert "nope.yaml" in msg and "does not exist" in msg


# ---- overrides ------------------------------------------------------------------------------


def test_dotlist_overrides_win_over_yaml():
    cfg = load_config(KD_RECIPE, ["optim.lr=3e-4", "loss.kd.temperature=4", "data.batch_size=5", "name=x"])
    assert cfg.optim.lr == 3e-4 and cfg.loss["kd"]["temperature"] == 4.0
    assert cfg.data.batch_size == 5 and cfg.name == "x"
    assert cfg.loss["kd"]["weight"] == 1.0 and cfg.optim.schedule == "cosine"  # untouched YAML values stay


def test_teacher_null_override():
    assert load_config(KD_RECIPE).teacher is not None
    assert load_config(KD_RECIPE, ["teacher=null"]).teacher is None


def test_interpolation_in_teacher_path_resolves():
    cfg = load_config(KD_RECIPE, ["out_root=/data/my-runs"])
    assert cfg.teacher.path == "/data/my-runs/windtunnel-teacher/latest/student"
    assert "${" not in to_yaml(cfg)
    assert load_config(KD_RECIPE).teacher.path == "runs/windtunnel-teacher/latest/student"


def test_override_without_equals_sign():
    msg = error_of(TEACHER_RECIPE, ["optim.lr"])
    assert "optim.lr" in msg and "key=value" in msg


# ---- errors name the key and say what would fix it ----------------------------------------


@pytest.mark.parametrize("override, key, suggestion", [
    ("nmae=x", "nmae", "name"),
    ("optim.lrr=1", "optim.lrr", "lr"),
    ("loss.kd.temprature=2", "loss.kd.temprature", "temperature"),
    ("data.windtunnel.n_trian=3", "data.windtunnel.n_trian", "n_train"),
    ("teacher.pth=/x", "teacher.pth", "path"),
])
def test_unknown_key_names_full_key_and_suggests(override, key, suggestion):
    msg = error_of(KD_RECIPE, [override])
    assert f"'{key}'" in msg and "unknown" in msg
    assert f"'{suggestion}'" in msg


def test_unknown_key_inside_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", {"teacher": None, "loss": {"ce": {"type": "ce", "wieght": 2}},
                                        "data": {"type": "windtunnel"}})
    msg = error_of(path)
    assert "'loss.ce.wieght'" in msg and "'weight'" in msg


@pytest.mark.parametrize("override, key", [
    ("optim.lr=abc", "optim.lr"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("seed=abc", "seed"),
    ("loss.kd.weight=heavy", "loss.kd.weight"),
    ("eval_teacher=maybe", "eval_teacher"),
])
def test_wrong_type_names_the_key(override, key):
    msg = error_of(KD_RECIPE, [override])
    assert f"'{key}'" in msg and "wrong type" in msg


@pytest.mark.parametrize("override, key, valid", [
    ("teacher.quantize=int4", "teacher.quantize", ("none", "int8", "nf4")),
    ("teacher.dtype=int8", "teacher.dtype", ("float32", "bfloat16", "float16")),
    ("optim.schedule=linear", "optim.schedule", ("cosine", "wsd", "constant")),
    ("loss.kd.mask=foo", "loss.kd.mask", ("answer", "image", "all", "answer+image")),
])
def test_bad_choice_lists_valid_values(override, key, valid):
    msg = error_of(KD_RECIPE, [override])
    assert f"'{key}'" in msg
    assert all(v in msg for v in valid)


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("optim.lr=0", "optim.lr"),
    ("loss.kd.temperature=0", "loss.kd.temperature"),
    ("loss.kd.beta=1.5", "loss.kd.beta"),
])
def test_out_of_range_names_the_key(override, key):
    assert f"'{key}'" in error_of(KD_RECIPE, [override])


def test_required_combinations():
    assert "teacher.path" in error_of(TEACHER_RECIPE, ["teacher.dtype=float16"])  # a teacher needs a path
    assert "data.train" in error_of(TEACHER_RECIPE, ["data.type=llava"])
    assert "loss.kd.type" in error_of(TEACHER_RECIPE, ["loss.kd.weight=1"])


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(KD_RECIPE, ["out_root=/o", "optim.betas=[0.8,0.95]", "trainer.devices=auto",
                                  "student.kwargs.text_kv_heads=1", "data.limit_val=3"])
    text = to_yaml(cfg)
    assert merge_config(yaml.safe_load(text)) == cfg
    back = load_config(write(tmp_path / "resolved.yaml", text))  # as a run's config.yaml is reused
    assert back == cfg and back.teacher.path == "/o/windtunnel-teacher/latest/student"
    assert back.optim.betas == [0.8, 0.95] and back.trainer.devices == "auto"
    no_teacher = load_config(KD_RECIPE, ["teacher=null"])
    assert merge_config(yaml.safe_load(to_yaml(no_teacher))) == no_teacher


# ---- registries ----------------------------------------------------------------------------


def test_check_kwargs_refuses_unknown_argument_with_suggestion():
    STUDENTS.check_kwargs("tiny_llava", {"text_hidden": 16, "text_layers": 1}, "student.kwargs")  # fine
    with pytest.raises(WorkbenchError) as info:
        STUDENTS.check_kwargs("tiny_llava", {"text_hiden": 16}, "student.kwargs")
    msg = str(info.value)
    assert "'student.kwargs.text_hiden'" in msg and "'text_hidden'" in msg


@pytest.mark.parametrize("kwargs, key", [
    ({"text_hidden": "big"}, "text_hidden"),
    ({"text_layers": 1.5}, "text_layers"),
    ({"text_heads": True}, "text_heads"),  # bool is not an int here
    ({"text_kv_heads": "1"}, "text_kv_heads"),  # int | None
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])
def test_check_kwargs_refuses_wrong_type(kwargs, key):
    with pytest.raises(WorkbenchError) as info:
        STUDENTS.check_kwargs("tiny_llava", kwargs, "student.kwargs")
    msg = str(info.value)
    assert f"'student.kwargs.{key}'" in msg and "wrong type" in msg and repr(kwargs[key]) in msg


def test_check_kwargs_accepts_none_for_optional_and_int_for_float():
    STUDENTS.check_kwargs("tiny_llava", {"text_kv_heads": None, "text_intermediate": 64}, "student.kwargs")


@pytest.mark.parametrize("registry, name, expected", [
    (STUDENTS, "tiny_lava", "tiny_llava"),
    (LOSSES, "forward_kld", "forward_kl"),
    (DATASETS, "windtunel", "windtunnel"),
])
def test_unknown_name_lists_registered(registry, name, expected):
    with pytest.raises(WorkbenchError) as info:
        registry.get(name, "some.key")
    msg = str(info.value)
    assert repr(name) in msg and "'some.key'" in msg
    assert f"Did you mean: '{expected}'" in msg
    assert "Registered: " + ", ".join(registry.names()) in msg
    assert expected in registry.names()


def test_loss_registry_lists_every_loss_type():
    expected = {"ce", "forward_kl", "reverse_kl", "jsd", "tvd", "mdist", "rdist", "feature_mse", "feature_cosine",
                "hidden_relation", "rkd_distance", "rkd_angle", "attention_kl", "qkv_relation"}
    assert expected <= set(LOSSES.names())
    with pytest.raises(WorkbenchError, match="Registered: attention_kl, breen_query, ce, eve_alignment, feature_cosine"):
        LOSSES.get("zzz")


@pytest.mark.parametrize("term, message", [
    ({"type": "feature_mse", "heads": [0, 1]}, "'loss.t.heads'.*takes no argument 'heads'"),
    ({"type": "ce", "temperature": 2.0}, "'loss.t.temperature'.*takes no argument 'temperature'"),
    ({"type": "forward_kl", "tempreature": 2.0}, "Did you mean: 'temperature'"),
    ({"type": "forward_kl", "divergence": "jsd"}, "'loss.t.divergence' is fixed by loss 'forward_kl'"),
    ({"type": "feature_mse"}, "loss.t \\(feature_mse\\): .*needs a 'student' tap"),
    ({"type": "attention_kl", "student": "x", "kind": "js"}, "unknown attention loss 'js'"),
    ({"type": "breen_query", "seed": "x"}, "'loss.t.seed' has the wrong type: expected int"),
])
def test_loss_term_options_are_checked_against_the_term_constructor(term, message):
    from workbench.build.loss import build_term

    with pytest.raises(WorkbenchError, match=message):
        LOSSES.check_kwargs(term["type"], {k: v for k, v in term.items() if k != "type"}, "loss.t")
        build_term("t", term)


def test_a_term_option_reaches_the_constructor():
    """Every constructor argument is reachable from a config, e.g. BREEN's query seed."""
    from workbench.build.loss import build_term

    assert build_term("q", {"type": "breen_query", "seed": 7}).seed == 7
    kd = build_term("kd", {"type": "jsd", "weight": 2.0, "temperature": 3.0, "beta": 0.25})
    assert (kd.divergence, kd.temperature, kd.beta) == ("jsd", 3.0, 0.25)


# ---- LR schedules ---------------------------------------------------------------------------


def test_warmup_is_linear():
    f = lr_multiplier("cosine", total_steps=100, warmup_steps=10)
    ramp = [f(s) for s in range(10)]
    assert ramp == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)  # peak right after warmup
    for schedule in ("wsd", "constant"):
        g = lr_multiplier(schedule, 100, 10)
        assert [g(s) for s in range(10)] == pytest.approx(ramp)


def test_cosine_formula_and_end_point():
    total, warmup, lo = 110, 10, 0.1
    f = lr_multiplier("cosine", total, warmup, min_ratio=lo)
    assert f(60) == pytest.approx(lo + (1 - lo) * 0.5)  # half-way through the decay: 0.55
    assert f(35) == pytest.approx(lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(total) == pytest.approx(lo) and f(total + 50) == pytest.approx(lo)  # stays at the floor
    values = [f(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert min(values) == pytest.approx(lo)
    assert lr_multiplier("cosine", total, warmup)(60) == pytest.approx(0.5)


def test_wsd_is_flat_then_decays_linearly_to_min_ratio():
    total, warmup, frac, lo = 100, 5, 0.2, 0.1
    f = lr_multiplier("wsd", total, warmup, decay_fraction=frac, min_ratio=lo)
    decay_start = 80
    assert all(f(s) == 1.0 for s in range(warmup, decay_start + 1))
    assert f(decay_start + 1) < 1.0
    assert f(90) == pytest.approx(1 - (1 - lo) * 0.5)  # linear: half-way down at the middle of decay
    assert f(total) == pytest.approx(lo)
    diffs = [f(s) - f(s + 1) for s in range(decay_start, total)]
    assert diffs == pytest.approx([diffs[0]] * len(diffs))


def test_constant_and_unknown_schedule():
    f = lr_multiplier("constant", 50, 0)
    assert {f(s) for s in range(60)} == {1.0}
    with pytest.raises(ValueError, match="linear"):
        lr_multiplier("linear", 50, 5)(20)


def test_two_stage_lr_drops_at_the_switch_and_weight_decay_goes_to_zero():
    total, warmup, lo = 100, 10, 0.0
    f = lr_multiplier("two_stage", total, warmup, min_ratio=lo, two_stage=(0.5, 0.6, 0.3))
    assert f(10) == pytest.approx(1.0) and f(30) == pytest.approx(1 - 0.4 * 0.5)  # linear to 0.6 at step 50
    assert f(49) > 0.6 > 0.3 == pytest.approx(f(50))  # the drop
    assert f(75) == pytest.approx(0.15) and f(total) == pytest.approx(lo)
    stage2 = [f(s) for s in range(50, total + 1)]
    assert all(a > b for a, b in zip(stage2, stage2[1:]))

    model = nn.Linear(4, 4)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, schedule="two_stage", warmup_steps=10, two_stage=[0.5, 0.6, 0.3])
    optimizer, scheduler = make_optimizer(model, optim, total)
    seen = []
    for _ in range(total):
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"],
                     optimizer.param_groups[1]["weight_decay"]))
        optimizer.step()
        scheduler.step()
    assert [d for _, d, _ in seen[:50]] == [0.1] * 50 and [d for _, d, _ in seen[50:]] == [0.0] * 50
    assert {d for _, _, d in seen} == {0.0}  # biases were never decayed
    assert seen[50][0] == pytest.approx(3e-3) and seen[30][0] == pytest.approx(8e-3)
    # a resumed run continues in stage 2 with no decay
    optimizer2, scheduler2 = make_optimizer(model, optim, total)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    assert optimizer2.param_groups[0]["weight_decay"] == 0.0
    scheduler2.step()
    assert optimizer2.param_groups[0]["weight_decay"] == 0.0


def test_warmup_longer_than_run_still_reaches_peak():
    f = lr_multiplier("cosine", total_steps=4, warmup_steps=100)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0)


# ---- parameter groups -----------------------------------------------------------------------


def test_param_groups_exclude_biases_and_norms_from_decay():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4, bias=False))
    model[0].weight.requires_grad_(False)  # frozen parameters go to no group
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model[1].weight, model[3].weight])
    assert ids(no_decay["params"]) == ids([model[1].bias, model[2].weight, model[2].bias])


def test_a_mapping_override_replaces_and_null_clears():
    path = "experiments/windtunnel/student_kd.yaml"
    assert load_config(path).student.kwargs  # the recipe sets some
    assert load_config(path, ["student.kwargs={}"]).student.kwargs == {}
    assert load_config(path, ["student.kwargs=null"]).student.kwargs == {}
    assert load_config(path, ["student.kwargs={text_hidden: 16}"]).student.kwargs == {"text_hidden": 16}
    merged = load_config(path, ["student.kwargs.text_hidden=16"]).student.kwargs  # a dotted key still merges
    assert merged["text_hidden"] == 16 and len(merged) > 1
    only = load_config(path, ["loss={ce: {type: ce}}"]).loss
    assert list(only) == ["ce"]
    assert load_config("experiments/windtunnel/quickstart.yaml", ["stages=null", "loss.ce.type=ce"]).stages == {}


def test_stages_new_on_the_command_line_run_in_the_order_they_are_named():
    """A mapping override (`stages.b={...}`) is applied before the dotted ones; the order of the
    stages still follows the command line, so `b` may name `stage:a`."""
    path = "experiments/windtunnel/student_kd.yaml"
    cfg = load_config(path, ["stages.a.trainer.max_steps=1", "stages.b={student: {path: 'stage:a'}}",
                             "stages.c.student.path=stage:b", "stages.a.trainer.val_every_n_steps=1"])
    assert [name for name, _ in stage_configs(cfg)] == ["a", "b", "c"]
    assert cfg.stages["a"] == {"trainer": {"max_steps": 1, "val_every_n_steps": 1}}


def test_a_stage_with_another_student_type_starts_from_its_own_kwargs():
    cfg = load_config(Path(__file__).parents[2] / "experiments" / "windtunnel" / "drafts.yaml",
                      ["stages.teacher=null", "vars.target=/some/folder"])
    stages = dict(stage_configs(cfg))
    assert stages["head"].student.type == "eagle_head"
    assert stages["head"].student.kwargs == {"init_layer": -1, "feature_noise": 0.0}
    assert stages["ce"].student.kwargs["text_layers"] == 2  # same type: the experiment's kwargs merge
    assert stages["kd"].teacher.path == "/some/folder" and stages["onpolicy"].on_policy.temperature == 1.0


def test_the_matformer_vlm_recipe_trains_its_independent_draft_baseline_before_the_universal_model():
    cfg = load_config(Path(__file__).parents[2] / "experiments" / "windtunnel" / "matformer_vlm.yaml")
    stages = stage_configs(cfg)
    assert [name for name, _ in stages] == ["teacher", "independent_quarter", "matformer"]  # `latest` = universal
    quarter = dict(stages)["independent_quarter"]
    assert quarter.student.kwargs["text_intermediate"] == 128 == quarter.student.kwargs["text_hidden"]
    assert quarter.matformer is None and dict(stages)["matformer"].matformer.granularities[2] == 0.25


def test_the_pmod_recipe_compares_its_token_skipping_students_from_one_start_at_one_budget():
    """The study's design: p-MoD with CE, p-MoD with KD and gamma-MoD start from the same dense
    model (trained 600 + 900 + 1,500 steps), train the same steps, distil from that model, and gamma-MoD's
    schedule keeps on average exactly the share of image tokens PRD keeps over the 8 layers."""
    from students.mod import mean_retention, schedule_ratios

    cfg = load_config(Path(__file__).parents[2] / "experiments" / "windtunnel" / "pmod.yaml")
    stages = dict(stage_configs(cfg))
    assert list(stages) == ["teacher", "teacher_more", "teacher_long", "pmod_ce", "pmod_kd", "gmod_kd"]
    assert stages["teacher_more"].student.path == "stage:teacher"
    assert stages["teacher_long"].student.path == "stage:teacher_more"
    assert sum(stages[n].trainer.max_steps for n in ("teacher", "teacher_more", "teacher_long")) == 3000
    compared = ["pmod_ce", "pmod_kd", "gmod_kd"]
    assert {stages[n].student.path for n in compared} == {"stage:teacher_long"}
    assert {stages[n].trainer.max_steps for n in compared} == {300}
    assert stages["pmod_ce"].teacher is None
    assert stages["pmod_kd"].teacher.path == stages["gmod_kd"].teacher.path == "stage:teacher_long"
    layers = stages["teacher"].student.kwargs["text_layers"]
    prd = mean_retention(schedule_ratios(stages["pmod_kd"].transforms["mod"]["schedule"], layers))
    gamma = mean_retention(schedule_ratios(list(stages["gmod_kd"].transforms["mod"]["schedule"]), layers))
    assert prd == pytest.approx(0.5375) and gamma == pytest.approx(prd, abs=1e-4)


def test_the_bitcpm4_recipe_compares_its_ternary_students_at_equal_steps_from_scratch():
    """The study's design: every stage that is compared (the fp control, ternary from scratch,
    QAT -> KD from either teacher, joint) has trained the same number of steps since its start
    from scratch, and the KD stage distils from the fp student QAT started from."""
    cfg = load_config(Path(__file__).parents[2] / "experiments" / "windtunnel" / "bitcpm4.yaml")
    stages = dict(stage_configs(cfg))

    def since_scratch(name):
        path = stages[name].student.path or ""
        parent = path.removeprefix("stage:") if path.startswith("stage:") else None
        return stages[name].trainer.max_steps + (since_scratch(parent) if parent else 0)

    compared = ["fp_more", "scratch", "kd", "kd_teacher", "joint"]
    assert {since_scratch(name) for name in compared} == {3600}
    assert stages["qat"].student.path == "stage:fp" == stages["kd"].teacher.path == stages["joint"].teacher.path
    assert stages["kd_teacher"].teacher.path == "stage:teacher"
    assert all(stages[n].transforms["ternary"]["weight_scale"] == "tensor" for n in ("qat", "scratch", "joint"))
