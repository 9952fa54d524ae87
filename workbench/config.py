"""The typed experiment config: dataclasses merged as defaults <- YAML (with `base:`) <- dotlist.

`load_config("experiments/x.yaml", ["optim.lr=3e-4"])` returns a `RunConfig`. Dataclass nodes
are closed, so a misspelt key fails with the closest valid names; a value of the wrong type
fails naming the key and the type it needs. Things are named by registry key (see
`workbench/registry.py`), never by import path; `workbench/build/` turns names into objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from workbench.errors import WorkbenchError
from workbench.registry import closest


@dataclass
class TeacherConfig:
    """A frozen teacher: a Hugging Face VLM (`hf_vlm`), a timm image classifier (`timm`), or a
    vision encoder whose patch features supervise an encoder-free student (`vision_encoder`)."""

    type: str = "hf_vlm"  # registry key (workbench/registry.py TEACHERS): hf_vlm | timm | vision_encoder
    path: str = MISSING  # folder or hub id; timm: also a checkpoint file (with `model`) or a timm model name
    model: str | None = None  # timm: the architecture of a checkpoint file, e.g. deit_base_patch16_224
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm: create_model arguments (num_classes, ...)
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quantize: str = "none"  # none | int8 | nf4 (bitsandbytes; vision tower, projector, lm_head kept)
    skip_modules: list[str] | None = None  # modules left unquantized (replaces the default list)
    trust_remote_code: bool = False
    layer: int = -2  # vision_encoder: the hidden state whose patch features teach (-2 penultimate: EVE; -1 last: BREEN)
    cache: str | None = None  # teacher-logit cache folder, or "auto" (<out_root>/teacher-cache/<fingerprint>)
    top_k: int = 16  # ids kept per position when this run makes the cache itself
    device: str = "auto"  # auto: the student's device | cpu: kept on the CPU (inputs go to it, logits come back)


@dataclass
class StudentConfig:
    """The trained model: a registered builder plus its arguments, or an exported folder."""

    type: str = "tiny_llava"  # registry key (workbench/registry.py STUDENTS)
    path: str | None = None  # start from an exported student / HF folder instead of random init
    processor: str | None = None  # processor folder when there is no teacher to share one with
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder arguments, checked by name and type


@dataclass
class WindTunnelConfig:
    """Parameters of the generated world (workbench/data/windtunnel.py)."""

    n_train: int = 8000
    n_val: int = 500
    seed: int = 0
    grid: int = 3  # cells per side (2 or 3)
    questions_per_image: int = 6  # one of each question type, in random order
    question_first: bool = False
    question_types: list[str] | None = None  # subset of count, color, shape, presence, position, cell (default all)
    n_classification: int = 0  # training images of the classification set (windtunnel_classification)
    patch_size: int | None = None  # pixels per image token side (default 16: one token per cell; 4 gives 16 per cell)
    frames: int | None = None  # clip mode: frames per record sharing background and objects (default 1: images)
    min_frames: int | None = None  # clip mode: clips of min_frames..frames frames, drawn per record (default: frames)
    motion: float | None = None  # clip mode: chance an object steps to a free neighbouring cell per frame (0.5)
    min_shapes: int | None = None  # objects per scene: min_shapes..max_shapes (default 1..3)
    max_shapes: int | None = None


@dataclass
class DataConfig:
    """Training and held-out conversations (LLaVA JSON, JSONL, Hugging Face datasets) or images."""

    type: str = "llava"  # registry key: llava | hf_dataset | windtunnel | image_folder | digits | windtunnel_classification
    train: str | None = None  # llava: .json list or .jsonl; hf_dataset: save_to_disk folder or .parquet/.arrow (glob); image_folder: <class>/<image>
    val: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # hf_dataset: {id, conversations|messages, image|images, qtypes} -> column
    image_folder: str | None = None  # image paths are relative to this (default: the data file's folder)
    absolute_images: bool = False  # allow absolute image paths in records (else they are refused)
    bad_images: str = "error"  # error | skip: records whose image is missing or unreadable (skipped are counted)
    root: str = "data"  # where the wind tunnel is generated (one sub-folder per world)
    windtunnel: WindTunnelConfig = field(default_factory=WindTunnelConfig)
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    max_length: int | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    labeled_fraction: float = 1.0  # share of training records whose answers the student may see
    split_seed: int = 0  # which records are labelled (independent of `seed`, so seed sweeps share it)
    unlabeled: str = "auto"  # the other records: pseudo (teacher answers) | drop | auto (pseudo if a teacher)
    disagreement_only: bool = False  # pseudo-labelled records: train only where the student disagrees
    max_new_tokens: int = 32  # longest teacher answer when pseudo-labelling
    # image classification (image_folder | digits | windtunnel_classification)
    image_size: int | None = None  # side the images are resized to (default: 224 for folders, else native)
    augment: bool = False  # timm's training transform (RandomResizedCrop + flip) on training images
    auto_augment: str | None = None  # with augment: a timm policy, e.g. rand-m9-mstd0.5-inc1
    val_fraction: float = 0.2  # digits: share held out (stratified by split_seed)


@dataclass
class OptimConfig:
    """AdamW (no decay on biases, norms and other 1-d parameters) and a per-step LR schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # cosine | wsd | constant | two_stage
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying (MiniCPM uses ~10%)
    min_lr_ratio: float = 0.0  # final LR as a fraction of `lr`
    # two_stage (BitNet b1.58): [switch fraction, LR at the end of stage 1, stage-2 peak], LRs as fractions
    # of `lr`; the weight decay drops to 0 at the switch
    two_stage: list[float] = field(default_factory=lambda: [0.5, 0.533, 0.333])
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer`."""

    max_steps: int = 1000
    max_time_minutes: float | None = None  # stop early after this much training time
    val_every_n_steps: int = 250
    log_every_n_steps: int = 10
    accelerator: str = "auto"
    devices: Any = 1  # int or "auto" (per node)
    num_nodes: int = 1  # machines (torchrun / SLURM set the ranks)
    strategy: str = "auto"  # auto | ddp (2 CPU processes work with gloo) | fsdp (FSDP2: student blocks sharded) | any Lightning name
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    checkpoint_every_n_steps: int | None = None  # default: at every validation
    progress_bar: bool = True
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # csv (always on) | tensorboard | wandb | mlflow
    fused_logits: bool = False  # logit terms from hidden states in row chunks (kernels/fused_linear_kd): no (B, L, V) student logits
    on_nonfinite: str = "stop"  # stop | skip: a nan/inf loss, term or gradient ends the run, or skips that step
    max_skipped_steps: int = 10  # with on_nonfinite=skip: the run stops at the next one after this many


@dataclass
class MatFormerConfig:
    """Nested FFNs trained jointly (students/matformer.py, docs/methods.md §2)."""

    granularities: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125])  # fractions of each FFN
    sample: int | None = None  # per step: the full width + this many sampled smaller ones (null: all, MatFormer-OLMo)
    self_distill: float = 0.0  # weight of KL(full-width student || smaller) added for every smaller granularity
    temperature: float = 1.0  # of that self-distillation
    target: str | None = None  # module path to nest (default: a VLM's language model, a timm model whole)


@dataclass
class OnPolicyConfig:
    """On-policy distillation (workbench/targets/on_policy.py, DistillSpec / GKD): the student
    answers a turn of each training record itself and learns the teacher's distribution on
    its own tokens."""

    fraction: float = 1.0  # share of training batches answered by the student (the rest: the records' answers)
    temperature: float = 1.0  # the student's sampling temperature (0: greedy)
    top_k: int | None = None
    max_new_tokens: int | None = None  # null: the longest answer of the batch's chosen turns
    turn: str = "random"  # which assistant turn of a record the student answers: random | first


@dataclass
class HybridConfig:
    """Attention -> Mamba-2 conversion of the student's language model (students/hybrid.py,
    docs/methods.md §4-§5), applied after the student is built and before `init_from` loads."""

    layers: Any = "ratio:0.25"  # all | every:K | ratio:R | not:<spec> | [indices]; MaTVLM-0.25 = ratio:0.25
    init: str = "attention"  # attention (C<-W_Q, B<-W_K, x<-W_V, out<-W_O) | random
    mimic: bool = False  # mmMamba's seeding: split projections, dt proj 0, A=-e, identity conv k=2, gate, no D
    keep_attention: bool = False  # keep the attention beside each mixer, pass its output on (mmMamba stages 1-2)
    chunk_size: int | None = None  # SSD chunk length (default 256, 128 with mimic)
    d_conv: int | None = None  # causal conv width (default 4, 2 with mimic)


@dataclass
class RunConfig:
    """One experiment: who teaches whom, on what, with which objective."""

    name: str = "run"
    seed: int = 0
    out_root: str = "runs"
    run_id: str | None = None  # default: <timestamp>-<config hash>
    teacher: TeacherConfig | None = None  # null: plain supervised training
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: dict[str, Any] = field(default_factory=dict)  # name -> {type, weight, the term's own options}
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval_teacher: bool = True  # score the teacher on the held-out split before training
    init_from: str | None = None  # start the student from: stage:<name> | teacher | a model folder
    trainable: list[str] | None = None  # glob patterns of parameter names to train; the rest is frozen
    stages: dict[str, Any] = field(default_factory=dict)  # name -> overlay of this config, run in order
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # key -> values: `workbench run` runs the grid
    vars: dict[str, Any] = field(default_factory=dict)  # your own values, used elsewhere as ${vars.name} (and swept)
    matformer: MatFormerConfig | None = None  # nest the student's FFNs and train every granularity each step
    hybrid: HybridConfig | None = None  # replace attention layers of the student's language model with Mamba-2
    transforms: dict[str, Any] = field(default_factory=dict)  # other registered student transforms: name -> options
    target: str = "auto"  # what the student learns from: auto | none | online_teacher | cached_teacher | vision_features | on_policy
    on_policy: OnPolicyConfig | None = None  # the student answers, the teacher scores its tokens (target on_policy)


CHOICES = {
    "teacher.quantize": ("none", "int8", "nf4"),
    "teacher.dtype": ("float32", "bfloat16", "float16", "auto"),
    "teacher.device": ("auto", "cpu"),
    "optim.schedule": ("cosine", "wsd", "constant", "two_stage"),
    "data.unlabeled": ("auto", "pseudo", "drop"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "data.bad_images": ("error", "skip"),
    "trainer.precision": ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true"),
}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file, resolving `base:` (a path relative to the file) recursively."""
    if not path.is_file():
        raise WorkbenchError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise WorkbenchError(f"config file {path}: `base:` chain loops back to itself")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise WorkbenchError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return OmegaConf.to_container(OmegaConf.merge(parent, data))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line out of PyYAML's multi-line report: the problem and where it is."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _explain(e: OmegaConfBaseException) -> WorkbenchError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    if isinstance(e, ConfigKeyError):
        return WorkbenchError(f"unknown config key '{key}': {msg}")
    if isinstance(e, MissingMandatoryValue):
        return WorkbenchError(f"config key '{key}' must be set")
    if isinstance(e, ValidationError):
        return WorkbenchError(f"config key '{key}' has the wrong type: {msg}")
    return WorkbenchError(f"config error at '{key}': {msg}")


def merge_config(*layers: dict | DictConfig) -> RunConfig:
    """defaults <- each layer in turn; returns the validated dataclass tree."""
    try:
        cfg = OmegaConf.structured(RunConfig)
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        run_cfg: RunConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e) from None
    validate(run_cfg)
    return run_cfg


def parse_overrides(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise WorkbenchError(f"override {bad[0]!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise WorkbenchError(f"cannot parse overrides {overrides}: {e}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """defaults <- YAML at `path` (with `base:` inheritance) <- `key=value` overrides.

    An override whose value is a mapping replaces the YAML's mapping at that key instead of
    merging into it (`student.kwargs={}` empties it, `student.kwargs={a: 1}` is exactly that);
    `null` on a mapping-typed key clears it (`stages=null` runs the top level alone).
    """
    data = _stages_by_name(_read_yaml(Path(path)))
    rest = []
    for override in overrides:
        key, value = _one_override(override)
        _stage_override(data, key, value)
        kind = _schema_type(key)
        if is_dataclass(kind) and value is not None and not isinstance(value, dict):
            raise WorkbenchError(f"config key '{key}' is a section, not a value; set its keys ({key}.<name>=...)")
        if isinstance(value, dict) or (value is None and kind is dict):
            _set_path(data, key, value or {})
        else:
            rest.append(override)
    return merge_config(data, parse_overrides(rest))


def _stage_override(data: dict, key: str, value: Any) -> None:
    """`stages.<name>...` on the command line: a stage new there runs where the command names it;
    `stages.<name>=null` must name a stage the experiment has (a misspelt name would leave the
    stage it meant to skip running)."""
    parts = key.split(".")
    if parts[0] != "stages" or len(parts) < 2 or not isinstance(data.setdefault("stages", {}), dict):
        return
    stages = data["stages"]
    if value is None and len(parts) == 2 and parts[1] not in stages:
        raise WorkbenchError(f"config key '{key}': the experiment has no stage {parts[1]!r} to skip "
                             f"(its stages: {', '.join(stages) or 'none'}){closest(parts[1], stages)}")
    stages.setdefault(parts[1], {})


def _one_override(override: str) -> tuple[str, Any]:
    """(dotted key, parsed value) of one `key=value`."""
    key = override.split("=", 1)[0].strip()
    value = OmegaConf.select(parse_overrides([override]), key)
    return key, OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _schema_type(key: str) -> Any:
    """The type the config schema gives `key`: dict for free-form mappings (kwargs, loss,
    stages), a dataclass for a section, None when the schema does not know it."""
    parent, _, leaf = key.rpartition(".")
    schema = OmegaConf.structured(RunConfig)
    try:
        node = OmegaConf.select(schema, parent) if parent else schema
        return OmegaConf.get_type(node, leaf) if isinstance(node, DictConfig) else None
    except (OmegaConfBaseException, AttributeError, KeyError):
        return None


def _set_path(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[leaf] = value


def _stages_by_name(data: dict) -> dict:
    """`stages:` may be a list of overlays with a `name` each; keep it as an ordered mapping."""
    stages = data.get("stages")
    if isinstance(stages, list):
        if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages):
            raise WorkbenchError("config key 'stages': a list of stages needs a 'name' in every entry")
        names = [s["name"] for s in stages]
        if len(set(names)) != len(names):
            raise WorkbenchError(f"config key 'stages': stage names repeat ({', '.join(names)})")
        data = {**data, "stages": {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in stages}}
    return data


STAGE_ONLY_AT_TOP = ("stages", "sweep", "name", "out_root", "run_id")
REPLACED_BY_STAGE = ("loss", "teacher", "trainable", "init_from")  # a stage's value replaces, never merges


def stage_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """The resolved config of every stage, in order: the experiment with the stage's overlay.

    A stage's `loss`, `teacher`, `trainable` and `init_from` replace the experiment's instead
    of merging into them, so each stage states its own objective; a stage that names another
    `student.type` starts from no `student.kwargs`. A stage set to null
    (`stages.teacher=null` on the command line) is skipped, e.g. to reuse a teacher trained
    by an earlier run.
    """
    base = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    base["stages"], base["sweep"] = {}, {}
    out = []
    for name, overlay in cfg.stages.items():
        if overlay is None:
            continue
        if not isinstance(overlay, dict):
            raise WorkbenchError(f"config key 'stages.{name}' must be a mapping of config keys")
        bad = [k for k in overlay if k in STAGE_ONLY_AT_TOP]
        if bad:
            raise WorkbenchError(f"config key 'stages.{name}.{bad[0]}' can only be set for the whole experiment")
        layer = dict(base)
        for key in REPLACED_BY_STAGE:
            if key in overlay:
                layer[key] = {} if key == "loss" else None
        student = overlay.get("student") or {}
        if isinstance(student, dict) and student.get("type") not in (None, base["student"]["type"]):
            layer["student"] = {**base["student"], "kwargs": {}}  # another builder: its own arguments only
        try:
            stage = merge_config(layer, overlay)
        except WorkbenchError as e:
            raise WorkbenchError(f"stage '{name}': {e}") from None
        out.append((name, stage))
    return out


STAGE_REF = "stage:"


def stage_ref(value: str | None, earlier: list[str], key: str) -> str | None:
    """The stage a `stage:<name>` value names (checked to be an earlier stage), else None."""
    if not value or not value.startswith(STAGE_REF):
        return None
    name = value[len(STAGE_REF):]
    if name not in earlier:
        where = f"earlier stages are {', '.join(earlier)}" if earlier else "there is no earlier stage"
        raise WorkbenchError(f"config key '{key}' names {value!r}, but {where}")
    return name


def _choice(key: str, value: str, options=None) -> None:
    options = options or CHOICES[key]
    if value not in options:
        raise WorkbenchError(f"config key '{key}' is {value!r}; expected one of {', '.join(options)}")


def _check_folder_name(key: str, value: str | None) -> None:
    """`name` / `run_id` become folders under out_root: one plain path component each."""
    if value is None:
        return
    if not value or value in (".", "..") or "/" in value or "\\" in value or value.startswith(".") or "\0" in value:
        raise WorkbenchError(f"config key '{key}' is {value!r}: it names a folder under out_root, so it must be a "
                             "plain name (no '/', no leading '.')")


def _nonfinite_key(value: Any, key: str) -> str | None:
    """The dotted key of the first nan / inf number in a config tree, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else key
    if is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if isinstance(value, dict):
        children = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((bad for k, v in children if (bad := _nonfinite_key(v, k))), None)


def validate(cfg: RunConfig) -> None:
    """Checks a type system cannot express: choices, ranges, required combinations."""
    bad = _nonfinite_key(cfg, "")
    if bad is not None:
        raise WorkbenchError(f"config key '{bad}' is not a finite number (nan or inf)")
    _check_folder_name("name", cfg.name)
    _check_folder_name("run_id", cfg.run_id)
    for key, values in cfg.sweep.items():
        if not isinstance(values, list) or not values:
            raise WorkbenchError(f"config key 'sweep.{key}' must be a non-empty list of values")
    if cfg.stages:
        _validate_stages(cfg)
        return
    if cfg.teacher is not None:
        _choice("teacher.quantize", cfg.teacher.quantize)
        _choice("teacher.dtype", cfg.teacher.dtype)
        _choice("teacher.device", cfg.teacher.device)
    _choice("optim.schedule", cfg.optim.schedule)
    _validate_trainer(cfg.trainer)
    o = cfg.optim
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise WorkbenchError(f"config key 'optim.betas' must be two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
        key = "warmup_steps" if o.warmup_steps < 0 else "weight_decay" if o.weight_decay < 0 else "grad_clip"
        raise WorkbenchError(f"config key 'optim.{key}' must be >= 0")
    if len(o.two_stage) != 3 or not 0 < o.two_stage[0] < 1 or not all(0 <= r <= 1 for r in o.two_stage[1:]):
        raise WorkbenchError("config key 'optim.two_stage' must be [switch fraction in (0, 1), stage-1 end LR ratio, "
                             f"stage-2 peak LR ratio] with ratios in [0, 1], got {list(o.two_stage)}")
    if cfg.data.type == "llava" and not cfg.data.train:
        raise WorkbenchError("config key 'data.train' must name a LLaVA-format JSON file (or set data.type=windtunnel)")
    _validate_registered(cfg)
    for key in ("data.batch_size", "trainer.max_steps", "trainer.val_every_n_steps"):
        section, attr = key.split(".")
        if getattr(getattr(cfg, section), attr) <= 0:
            raise WorkbenchError(f"config key '{key}' must be > 0")
    _validate_windtunnel(cfg.data.windtunnel)
    if cfg.optim.lr <= 0:
        raise WorkbenchError("config key 'optim.lr' must be > 0")
    _validate_transforms(cfg)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise WorkbenchError("config key 'data.val_fraction' must be in (0, 1)")
    if not 0.0 <= cfg.data.labeled_fraction <= 1.0:
        raise WorkbenchError("config key 'data.labeled_fraction' must be in [0, 1]")
    _choice("data.unlabeled", cfg.data.unlabeled)
    _choice("data.bad_images", cfg.data.bad_images)
    if cfg.teacher is not None and cfg.teacher.top_k < 1:
        raise WorkbenchError("config key 'teacher.top_k' must be >= 1")


def _validate_stages(cfg: RunConfig) -> None:
    """Each stage (merged and validated on its own) may name only earlier stages."""
    names = []
    for name, stage in stage_configs(cfg):  # merge_config validates each stage
        values = {"init_from": stage.init_from, "teacher.path": stage.teacher.path if stage.teacher else None,
                  "student.path": stage.student.path,
                  **{f"student.kwargs.{k}": v for k, v in stage.student.kwargs.items() if isinstance(v, str)}}
        for key, value in values.items():
            stage_ref(value, names, f"stages.{name}.{key}")
        names.append(name)
    if not names:
        raise WorkbenchError("config key 'stages': every stage is null (skipped); nothing would run")


def _validate_windtunnel(wt: WindTunnelConfig) -> None:
    if wt.grid not in (2, 3):
        raise WorkbenchError("config key 'data.windtunnel.grid' must be 2 or 3")
    from workbench.data.windtunnel import EXTRA_QUESTION_TYPES, QUESTION_TYPES

    types = wt.question_types or list(QUESTION_TYPES)
    known = QUESTION_TYPES + EXTRA_QUESTION_TYPES
    unknown = sorted(set(types) - set(known))
    if unknown or len(set(types)) != len(types):
        raise WorkbenchError(f"config key 'data.windtunnel.question_types': {unknown or types} - choose distinct "
                             f"names from {', '.join(known)}")
    if wt.patch_size is not None and (wt.patch_size < 1 or 16 % wt.patch_size):
        raise WorkbenchError(f"config key 'data.windtunnel.patch_size' must divide the 16-pixel cell (1, 2, 4, 8 or "
                             f"16), got {wt.patch_size}")
    low, high = wt.min_shapes or 1, wt.max_shapes or 3
    if not 1 <= low <= high <= min(wt.grid ** 2, 18):
        raise WorkbenchError(f"config key 'data.windtunnel.min_shapes'/'max_shapes': need 1 <= min_shapes <= "
                             f"max_shapes <= {min(wt.grid ** 2, 18)} (cells of the grid), got {low}..{high}")
    if wt.frames is not None and wt.frames < 1:
        raise WorkbenchError(f"config key 'data.windtunnel.frames' must be >= 1, got {wt.frames}")
    if wt.min_frames is not None and not 1 <= wt.min_frames <= (wt.frames or 1):
        raise WorkbenchError(f"config key 'data.windtunnel.min_frames' must be in 1..frames ({wt.frames or 1}), "
                             f"got {wt.min_frames}")
    if wt.motion is not None and not 0 <= wt.motion <= 1:
        raise WorkbenchError(f"config key 'data.windtunnel.motion' must be in [0, 1], got {wt.motion}")
    if not 1 <= wt.questions_per_image <= len(types):
        raise WorkbenchError(f"config key 'data.windtunnel.questions_per_image' must be in 1..{len(types)} "
                             "(one question per type)")


def _validate_registered(cfg: RunConfig) -> None:
    """Loss terms, transforms and the target name registered entries, with arguments their
    constructors take (each loss term is also constructed once: its values are checked there)."""
    from workbench.registry import TARGETS, TRANSFORMS

    if not cfg.loss:
        raise WorkbenchError("config key 'loss' has no terms; add one, e.g. loss.ce.type=ce")
    for name, term in cfg.loss.items():
        _validate_term(name, term)
    for name, options in cfg.transforms.items():
        TRANSFORMS.get(name, "transforms")
        if options is not None and not isinstance(options, dict):
            raise WorkbenchError(f"config key 'transforms.{name}' must be a mapping of options (or {{}})")
        TRANSFORMS.check_kwargs(name, dict(options or {}), f"transforms.{name}")
        check = TRANSFORMS.info[name].get("check")  # values that need no model: before any stage trains
        if check is not None:
            try:
                check(**dict(options or {}))
            except ValueError as e:
                raise WorkbenchError(f"config key 'transforms.{name}': {e}") from None
    if cfg.target != "auto":
        TARGETS.get(cfg.target, "target")


def _validate_transforms(cfg: RunConfig) -> None:
    """The `matformer:` and `hybrid:` blocks (the transforms check the rest when applied)."""
    if cfg.matformer is not None:
        m = cfg.matformer
        if not m.granularities or max(m.granularities) != 1.0 or min(m.granularities) <= 0:
            raise WorkbenchError("config key 'matformer.granularities' must be fractions in (0, 1] including 1.0")
        if m.sample is not None and not 1 <= m.sample < len(m.granularities):
            raise WorkbenchError(f"config key 'matformer.sample' must be in 1..{len(m.granularities) - 1} (or null: all)")
        if m.self_distill and cfg.trainer.fused_logits:
            raise WorkbenchError("config key 'matformer.self_distill' needs the student's logits; set trainer.fused_logits=false")
    if cfg.hybrid is not None and cfg.hybrid.init not in ("attention", "random"):
        raise WorkbenchError(f"config key 'hybrid.init' must be attention or random, got {cfg.hybrid.init!r}")


def _validate_term(name: str, term: Any) -> None:
    """One `loss.<name>` block: a registered type, a numeric weight, options its constructor
    accepts (built once here, so a bad value fails at load, naming its key)."""
    from workbench.registry import LOSSES

    if not isinstance(term, dict):
        raise WorkbenchError(f"config key 'loss.{name}' must be a mapping {{type: ..., weight: ..., ...}}, got {term!r}")
    if not isinstance(term.get("type"), str):
        raise WorkbenchError(f"config key 'loss.{name}.type' must be set to a loss type")
    weight = term.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise WorkbenchError(f"config key 'loss.{name}.weight' has the wrong type: expected a number, got {weight!r}")
    LOSSES.get(term["type"], f"loss.{name}.type")
    options = {k: v for k, v in term.items() if k not in ("type", "weight")}
    LOSSES.check_kwargs(term["type"], options, f"loss.{name}", siblings=("type", "weight"))
    try:
        LOSSES.build(term["type"], f"loss.{name}", **options)
    except ValueError as e:
        key = next((k for k in options if k in str(e)), None)
        raise WorkbenchError(f"config key 'loss.{name}{'.' + key if key else ''}': {e}") from None


def _validate_trainer(t: TrainerConfig) -> None:
    from workbench.loggers import LOGGERS

    for name in t.loggers:
        _choice("trainer.loggers", name, LOGGERS)
    _choice("trainer.on_nonfinite", t.on_nonfinite)
    _choice("trainer.precision", str(t.precision))
    at_least_1 = {"accumulate_grad_batches": t.accumulate_grad_batches, "log_every_n_steps": t.log_every_n_steps,
                  "checkpoint_every_n_steps": 1 if t.checkpoint_every_n_steps is None else t.checkpoint_every_n_steps}
    if isinstance(t.devices, int):  # also "auto", a list of ids or Lightning's "0,1"
        at_least_1["devices"] = t.devices
    at_least_1["num_nodes"] = t.num_nodes
    if t.strategy == "fsdp" and not isinstance(t.devices, int):
        raise WorkbenchError("config key 'trainer.devices' must be a number of devices per node with trainer.strategy=fsdp")
    for key, value in at_least_1.items():
        if value < 1:
            raise WorkbenchError(f"config key 'trainer.{key}' must be >= 1, got {getattr(t, key)!r}")
    if t.max_time_minutes is not None and t.max_time_minutes <= 0:
        raise WorkbenchError("config key 'trainer.max_time_minutes' must be > 0 (or null: no limit)")
    if t.max_skipped_steps < 0:
        raise WorkbenchError("config key 'trainer.max_skipped_steps' must be >= 0")


def to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config, as written to a run directory's config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
