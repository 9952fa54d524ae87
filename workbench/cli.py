"""`workbench` command line: run (single, multi-stage, sweeps, resume), cache-teacher, eval, compare,
extract, data, bench, doctor.

Bad input of any kind exits with code 2 and a short message (no traceback; `--debug` shows
it). Anything else that fails is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from workbench import interrupt
from workbench.device import check_kernels_package
from workbench.errors import INPUT_ERRORS, WorkbenchError, exit_code

EXIT_BAD_INPUT = 2


def _cmd_run(args: argparse.Namespace) -> None:
    from workbench.config import load_config
    from workbench.run import resume, run
    from workbench.sweep import parse_sweep_args, run_sweep

    interrupt.install()  # SIGTERM / SIGINT end the run `interrupted`, exit 143 / 130
    if args.resume:
        if args.config or args.overrides or args.sweep:
            raise WorkbenchError("--resume RUN_DIR takes no config, overrides or --sweep (the run's config.yaml is used)")
        run_dir = resume(args.resume)
    elif not args.config:
        raise WorkbenchError("give an experiment config (workbench run CONFIG [key=value ...]) or --resume RUN_DIR")
    else:
        cfg = load_config(args.config, args.overrides)
        if args.sweep or cfg.sweep:
            print(f"sweep written to {run_sweep(args.config, args.overrides, parse_sweep_args(args.sweep or []))}")
            return
        run_dir = run(cfg)
    from workbench.rundir import RunDir

    directory = RunDir(run_dir)
    if directory.results.is_file():
        print(directory.results.read_text())
        print(f"written to {run_dir}")
        return
    summary = directory.read_summary()
    if summary is not None:
        _print_summary(run_dir, summary)


def _cmd_cache_teacher(args: argparse.Namespace) -> None:
    from workbench.config import load_config
    from workbench.targets.cached import cache_teacher

    directory, stats = cache_teacher(load_config(args.config, args.overrides), stage=args.stage, top_k=args.top_k,
                                     out=args.out)
    print(f"teacher cache {directory}: {stats}")


def _cmd_extract(args: argparse.Namespace) -> None:
    from workbench.elastic import extract_to

    report = extract_to(args.source, args.spec, args.out, args.skip)
    widths, skip = report["widths"], report["skip"]
    kept = [w for i, w in enumerate(widths) if i not in set(skip)]
    print(f"spec: widths {kept}" + (f", skipped layers {skip}" if skip else "") + f" ({len(kept)} of {len(widths)} layers)")
    before, after = report["params_before"], report["params_after"]
    print(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
    print(f"written to {report['out']}")


def _print_summary(run_dir, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['name']} — {run_dir}")
    table.add_column("model")
    table.add_column("params", justify="right")
    per_type = any(k.startswith("acc/") for who in ("teacher", "student") for k in (summary.get(who) or {}))
    table.add_column("answer acc" if per_type else "accuracy", justify="right")
    for who in ("teacher", "student"):
        metrics = summary.get(who)
        if metrics is None:
            continue
        params = summary["params"].get(who)
        table.add_row(who, f"{params:,}" if params else "-", f"{metrics.get('acc', float('nan')):.3f}")
    Console(stderr=False).print(table)


def _cmd_data(args: argparse.Namespace) -> None:
    from workbench.data.windtunnel import WorldConfig, write_windtunnel

    world = WorldConfig(grid=args.grid, questions_per_image=args.questions_per_image,
                        question_first=args.question_first)
    try:
        out = write_windtunnel(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                               n_classification=args.n_classification, world=world)
    except FileExistsError as e:
        raise WorkbenchError(str(e)) from None
    print(f"wrote the wind tunnel to {out}: train.json, val.json, images/, processor/"
          + (", classification/" if args.n_classification else ""))


def _optional_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """An optional CONFIG positional followed by overrides: `key=value` there is an override."""
    from pathlib import Path

    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, list(overrides)


def _cmd_eval(args: argparse.Namespace) -> None:
    from workbench.evaluation import eval_command

    config, overrides = _optional_config(args.config, args.overrides)
    eval_command(args.source, config, overrides, data=args.data, processor=args.processor,
                 image_folder=args.image_folder, teacher=args.teacher, out=args.out, batch_size=args.batch_size,
                 reduce=args.reduce)


def _cmd_analyze_arank(args: argparse.Namespace) -> None:
    from workbench.analysis import arank_command

    config, overrides = _optional_config(args.config, args.overrides)
    arank_command(args.source, config, overrides, data=args.data, batches=args.batches, batch_size=args.batch_size,
                  mod_layers=args.mod_layers, ratio=args.ratio, out=args.out)


def _cmd_analyze_gsearch(args: argparse.Namespace) -> None:
    from workbench.analysis import gsearch_command

    config, overrides = _optional_config(args.config, args.overrides)
    gsearch_command(args.source, config, overrides, data=args.data, tolerance=args.tolerance, layer=args.layer,
                    queries=args.queries, batches=args.batches, batch_size=args.batch_size, steps=args.steps,
                    out=args.out)


def _cmd_compress(args: argparse.Namespace) -> None:
    from workbench.compress import compress_command

    compress_command(args)


def _cmd_compare(args: argparse.Namespace) -> None:
    from workbench.results import compare_command

    print(compare_command(args.paths, by=args.by, metrics=args.metric, fmt=args.format,
                          group_seeds=not args.per_run, mixed=args.mixed), end="")
    if args.plot:
        from workbench.compare_plot import plot_compare
        from workbench.results import load_runs

        plot_compare(load_runs(*args.paths), args.plot, by=args.by, x=args.x, mixed=args.mixed)
        print(f"plot written to {args.plot}")


def _cmd_bench_kernels(args: argparse.Namespace) -> None:
    from workbench.bench.kernels import bench_kernels_command

    bench_kernels_command(args.ops, quick=args.quick, repeats=args.repeats, json_out=args.json, timeout=args.timeout)


def _cmd_bench_decode(args: argparse.Namespace) -> None:
    from workbench.bench.decode import bench_decode_command

    bench_decode_command(args.source, args.contexts, args.tokens, args.batch, args.hidden, args.layers, args.heads,
                         args.ratio, args.device, args.dtype, args.json)


def _cmd_bench_elastic(args: argparse.Namespace) -> None:
    from workbench.bench.elastic import bench_elastic_command

    bench_elastic_command(args.source, args.spec, args.batch, args.repeats, args.skip, args.json, args.plot)


def _cmd_bench_step(args: argparse.Namespace) -> None:
    from workbench.bench.step import bench_step_command

    config, overrides = _optional_config(args.config, args.overrides)
    bench_step_command(config, overrides, args.steps, args.warmup, args.batch, args.threads, args.json)


def _cmd_bench_first_step(args: argparse.Namespace) -> None:
    from workbench.bench.startup import bench_first_step_command

    bench_first_step_command(args.records, args.images, args.overrides, args.json)


def _cmd_bench_compress(args: argparse.Namespace) -> None:
    from workbench.bench.compress import bench_compress_command

    config, overrides = _optional_config(args.config, args.overrides)
    presets = [p for p in args.presets.split(",") if p] if args.presets else None
    bench_compress_command(args.source, config, overrides, presets, args.data, args.new_tokens, args.repeats,
                           args.threads, args.batch_size, args.json, args.plot, args.keep, args.reference)


def _cmd_bench_speculative(args: argparse.Namespace) -> None:
    from workbench.bench.speculative import bench_speculative_command

    config, overrides = _optional_config(args.config, args.overrides)
    bench_speculative_command(args.source, args.draft, config, overrides, args.data, args.gamma, args.prompts,
                              args.new_tokens, args.temperature, args.top_k, args.seed, args.threads, args.json,
                              args.draft_reduce)


def _cmd_bench_tokens(args: argparse.Namespace) -> None:
    from workbench.bench.tokens import bench_tokens_command

    config, overrides = _optional_config(args.config, args.overrides)
    bench_tokens_command(args.source, config, overrides, args.data, args.mod or [], args.reduce, args.repeats,
                         args.new_tokens, args.threads, args.batch_size, args.hidden, args.intermediate, args.layers,
                         args.heads, args.kv_heads, args.vocab, args.image_tokens, args.text_tokens, args.json,
                         args.plot)


def _cmd_doctor(args: argparse.Namespace) -> None:
    from workbench.device import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return
    print(f"python {env['python']} on {env['platform']}")
    for name, version in env["packages"].items():
        print(f"  {name:<20} {version or 'not installed'}")
    cuda = env["cuda"]
    print(f"CUDA: {'yes ' + str(cuda['devices']) if cuda['available'] else 'no'} (torch built for CUDA {cuda['version']})")
    print(f"Triton: {'installed' if env['triton'] else 'not installed'}")
    print(f"bitsandbytes (+accelerate): {'usable' if env['bitsandbytes'] else 'missing'}")
    print(f"mamba-ssm: {env['mamba_ssm']}")
    print(f"kernel path: {env['kernels']} (WB_KERNELS=ref|triton|auto)")


def _model_on_held_out(p: argparse.ArgumentParser) -> None:
    """The arguments of a command that measures a model on a held-out split."""
    p.add_argument("source", help="a run or stage directory, or a model folder")
    p.add_argument("config", nargs="?", help="experiment YAML whose data.val to use (default: the run's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of that config")
    p.add_argument("--data", help="a held-out LLaVA-format JSON instead")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Distil and compress VLMs and ViTs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own output (Lightning's banners and "
                                                         "model summary, loading bars, warnings); by default it "
                                                         "goes to the run directory's run.log")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train as an experiment config says")
    r.add_argument("config", nargs="?", help="experiment YAML, e.g. experiments/windtunnel/quickstart.yaml")
    r.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=3e-4 teacher=null")
    r.add_argument("--sweep", action="append", metavar="KEY=A,B,C",
                   help="run the grid of these values (repeatable: the product of all); finished runs are skipped")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    r.set_defaults(func=_cmd_run)

    ct = sub.add_parser("cache-teacher", help="run the teacher once over the training data: top-k logits (+ pseudo-labels)")
    ct.add_argument("config", help="the experiment whose student will distil from the cache")
    ct.add_argument("overrides", nargs="*", help="key=value config overrides")
    ct.add_argument("--top-k", type=int, help="token ids kept per position (default teacher.top_k)")
    ct.add_argument("--out", help="cache folder (default <out_root>/teacher-cache/<fingerprint>)")
    ct.add_argument("--stage", help="for multi-stage experiments: the stage whose teacher to cache")
    ct.set_defaults(func=_cmd_cache_teacher)

    d = sub.add_parser("data", help="generate data sets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    w = dsub.add_parser("windtunnel", help="write the wind tunnel (LLaVA format + image folders + processor)")
    w.add_argument("--out", required=True)
    w.add_argument("--n-train", type=int, default=8000, help="training images")
    w.add_argument("--n-val", type=int, default=500, help="held-out images")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--n-classification", type=int, default=0, help="training images of the classification set (val gets a fifth)")
    w.add_argument("--grid", type=int, default=3, choices=(2, 3), help="cells per side")
    w.add_argument("--questions-per-image", type=int, default=6, help="questions (turns) per image, at most 6")
    w.add_argument("--question-first", action="store_true", help="put the first question before the image")
    w.set_defaults(func=_cmd_data)

    ev = sub.add_parser("eval", help="score a run's or a folder's model (and its teacher) on a held-out split; "
                                     "writes eval.json")
    ev.add_argument("source", help="a run directory (its exported student; a multi-stage run's last), a stage "
                                   "directory, or a model folder (exported student, extracted submodel, teacher)")
    ev.add_argument("config", nargs="?", help="experiment YAML whose data.val to score on (default: the run's config)")
    ev.add_argument("overrides", nargs="*", help="key=value overrides of that config, e.g. data.limit_val=100")
    ev.add_argument("--data", help="a held-out LLaVA-format JSON, or for an image classifier a <class>/<image> folder")
    ev.add_argument("--image-folder", help="with --data: where its image paths are relative to (default: its folder)")
    ev.add_argument("--processor", help="with --data: the processor folder (default: the model folder's)")
    ev.add_argument("--teacher", help="a teacher folder to score beside it, or 'none' (default: the config's teacher)")
    ev.add_argument("--batch-size", type=int, help="default data.eval_batch_size, or 32")
    ev.add_argument("--out", help="where to write eval.json (default: in the run directory, else here)")
    ev.add_argument("--reduce", metavar="SPEC", help="score the model with a training-free token reducer, e.g. "
                                                     "attention_prune:layer=1,keep=0.5 (the teacher is scored as it is)")
    ev.set_defaults(func=_cmd_eval)

    an = sub.add_parser("analyze", help="measure a trained model to choose how to compress it")
    ansub = an.add_subparsers(dest="analysis", required=True)
    ar = ansub.add_parser("arank", help="per-layer attention rank (gamma-MoD): the low-rank layers are the MoD "
                                        "candidates; writes arank.json with a transforms.mod.schedule")
    _model_on_held_out(ar)
    ar.add_argument("--batches", type=int, default=4, help="batches to average over (default 4)")
    ar.add_argument("--batch-size", type=int, default=8, help="default 8")
    ar.add_argument("--mod-layers", type=int, help="MoD layers in the schedule: the lowest-ranked ones "
                                                    "(default 7/8 of the layers, as gamma-MoD's 28 of 32)")
    ar.add_argument("--ratio", type=float, default=0.5, help="their retention ratio (default 0.5)")
    ar.add_argument("--out", help="where to write arank.json (default: in the run directory, else here)")
    ar.set_defaults(func=_cmd_analyze_arank)
    gs = ansub.add_parser("gsearch", help="G-Search: the per-layer image-token keep schedule with the lowest FLOPs "
                                          "whose answer KL to the unreduced model stays within a tolerance; writes "
                                          "gsearch.json (a reducer spec and a transforms.mod.schedule)")
    _model_on_held_out(gs)
    gs.add_argument("--tolerance", type=float, default=0.05, help="mean answer-token KL allowed (default 0.05)")
    gs.add_argument("--layer", type=int, default=1, help="the scoring layer; the layers after it are pruned")
    gs.add_argument("--queries", default="text", help="after_image | last_token | text (default text)")
    gs.add_argument("--batches", type=int, default=2, help="calibration batches; the next as many check the result")
    gs.add_argument("--batch-size", type=int, default=16)
    gs.add_argument("--steps", type=int, default=16, help="keep fractions are multiples of 1/steps (default 16)")
    gs.add_argument("--out", help="where to write gsearch.json (default: in the run directory, else here)")
    gs.set_defaults(func=_cmd_analyze_gsearch)

    c = sub.add_parser("compare", help="one table of runs: the settings that differ, metrics as mean ± std over seeds")
    c.add_argument("paths", nargs="+", help="run dirs, sweep dirs, folders of runs or globs, e.g. 'runs/study/sweep-*'")
    c.add_argument("--by", action="append", metavar="KEY", help="config key to group by (repeatable; default: those that differ)")
    c.add_argument("--metric", action="append", metavar="NAME", help="summary key, e.g. student.acc/color (repeatable)")
    c.add_argument("--format", choices=("md", "csv", "json"), default="md")
    c.add_argument("--per-run", action="store_true", help="one row per run instead of averaging over seeds")
    c.add_argument("--plot", metavar="PNG", help="also draw held-out accuracy against step per row, and against "
                                                 "parameters (or --x) when the runs differ in size")
    c.add_argument("--x", default="params.student", help="summary key for the size axis of --plot, e.g. a "
                                                          "measured latency (default params.student)")
    c.add_argument("--mixed", action="store_true", help="average runs scored on different held-out data, teachers or "
                                                       "evaluation code (refused by default)")
    c.set_defaults(func=_cmd_compare)

    x = sub.add_parser("extract", help="cut a Mix'n'Match submodel out of a MatFormer model into its own folder")
    x.add_argument("source", help="a run directory (its exported student; last stage for multi-stage) or a model folder")
    x.add_argument("--spec", required=True,
                   help="uniform:<fraction> | widths:<w1,w2,...> (hidden units or fractions, one per layer) | "
                        "budget:<params, e.g. 1.5B> (largest submodel that fits, widths non-decreasing with depth)")
    x.add_argument("--skip", help="layers to drop, e.g. 20-24 or 3,7")
    x.add_argument("--out", required=True, help="new folder for the submodel")
    x.set_defaults(func=_cmd_extract)

    q = sub.add_parser("compress", help="quantize a student into a folder that reloads quantized (presets of the "
                                         "on-device VLMs, or one method); writes compress.json beside it")
    q.add_argument("source", help="a run directory (its exported student; a multi-stage run's last) or a model folder")
    q.add_argument("--out", required=True, help="new folder for the quantized model")
    q.add_argument("--preset", help="tinygptv_int8 | minicpmv_nf4 | bluelm_mixed | int8 | nf4 | int4 | llm_int8")
    q.add_argument("--method", help="one scheme for --scope: int8 | int4 (torchao) | nf4 | llm_int8 (bitsandbytes) | "
                                    "ternary (packed 2-bit; a ternary student needs no flag)")
    q.add_argument("--scope", action="append", help="with --method: llm | vision | connector | lm_head "
                                                    "(repeatable; default llm and vision)")
    q.add_argument("--skip", action="append", metavar="PATTERN",
                   help="Linear layers kept in full precision: a glob on full names ('*out_proj') or a module "
                        "prefix ('model.vision_tower'); repeatable; replaces the preset's list (lm_head is kept "
                        "unless --quantize-lm-head)")
    q.add_argument("--group-size", type=int, help="inputs per scale of int4 (default 32) and of ternary (default: one "
                                                  "scale per matrix)")
    q.add_argument("--double-quant", action="store_true", default=None, help="nf4: quantize the block scales too")
    q.add_argument("--quantize-lm-head", action="store_true", help="quantize the LM head with the LLM's scheme")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=_cmd_compress)

    b = sub.add_parser("bench", help="benchmarks: peak memory and time against baselines, as a table and JSON")
    bsub = b.add_subparsers(dest="benchmark", required=True)
    bk = bsub.add_parser("kernels", help="fused kernels vs naive torch, each measurement in a fresh subprocess")
    bk.add_argument("--ops", default="fused_linear_kd,attention_kl,relation_loss",
                    help="comma-separated ops (default: all)")
    bk.add_argument("--quick", action="store_true", help="shrunk shapes (N/8, V/16) for a smoke test")
    bk.add_argument("--repeats", type=int, default=1, help="timed forward+backward runs per measurement (best)")
    bk.add_argument("--json", metavar="OUT", help="also write the rows and the machine to this JSON file")
    bk.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measurement")
    bk.set_defaults(func=_cmd_bench_kernels)

    be = bsub.add_parser("elastic", help="MatFormer submodels: parameters, FLOPs, CPU latency, accuracy")
    be.add_argument("source", help="a run directory (accuracy on its held-out split), a model folder, or timm:<name> "
                                   "(nested on the fly; latency only)")
    be.add_argument("--spec", action="append", help="a spec to measure (repeatable; default: every uniform "
                                                     "granularity + budget specs between them)")
    be.add_argument("--skip", help="layers every --spec drops, e.g. 20-24")
    be.add_argument("--batch", type=int, default=8, help="batch size of the latency measurement")
    be.add_argument("--repeats", type=int, default=5, help="timed forward passes per spec (median)")
    be.add_argument("--json", metavar="OUT", help="also write the rows and the machine to this JSON file")
    be.add_argument("--plot", metavar="PNG", help="accuracy (or latency) against parameters")
    be.set_defaults(func=_cmd_bench_elastic)

    bd = bsub.add_parser("decode", help="per-token decode latency and cache memory vs context: transformer, "
                                        "25%% Mamba hybrid, all-Mamba")
    bd.add_argument("source", nargs="?", help="a causal LM / VLM folder to convert (default: a random Llama "
                                              "of --hidden/--layers/--heads)")
    bd.add_argument("--contexts", default="1k,4k,16k", help="context lengths (default 1k,4k,16k)")
    bd.add_argument("--tokens", type=int, default=32, help="decode steps timed per context (median)")
    bd.add_argument("--batch", type=int, default=1)
    bd.add_argument("--hidden", type=int, default=256)
    bd.add_argument("--layers", type=int, default=8)
    bd.add_argument("--heads", type=int, default=4)
    bd.add_argument("--ratio", type=float, default=0.25, help="share of layers the hybrid converts (default 0.25)")
    bd.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bd.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    bd.add_argument("--json", metavar="OUT", help="also write the rows and the machine to this JSON file")
    bd.set_defaults(func=_cmd_bench_decode)

    bs = bsub.add_parser("step", help="a DistillModule training step vs a hand-written torch loop on the same "
                                      "models and batch (target ratio <= 1.05)")
    bs.add_argument("config", nargs="?", help="a CE + forward-KL experiment with an online teacher (default: the wind "
                                              "tunnel KD recipe with a random teacher of the wind-tunnel size)")
    bs.add_argument("overrides", nargs="*", help="key=value overrides")
    bs.add_argument("--steps", type=int, default=60, help="timed pairs of steps")
    bs.add_argument("--warmup", type=int, default=5, help="pairs discarded first")
    bs.add_argument("--batch", type=int, default=32)
    bs.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    bs.add_argument("--json", metavar="OUT", help="also write the result and the machine to this JSON file")
    bs.set_defaults(func=_cmd_bench_step)

    bf = bsub.add_parser("first-step", help="time from `workbench run` to the first training step on a large "
                                            "LLaVA JSON (target < 60 s)")
    bf.add_argument("overrides", nargs="*", help="key=value overrides of the run")
    bf.add_argument("--records", type=int, default=200_000)
    bf.add_argument("--images", type=int, default=3000, help="distinct image files the records share")
    bf.add_argument("--json", metavar="OUT", help="also write the result and the machine to this JSON file")
    bf.set_defaults(func=_cmd_bench_first_step)

    bc = bsub.add_parser("compress", help="full precision and each quantization preset: bytes, peak RSS, prefill "
                                          "and decode speed, KL to full precision, agreement, accuracy")
    bc.add_argument("source", help="a run directory (scored on its held-out split) or a model folder (with --data)")
    bc.add_argument("config", nargs="?", help="experiment YAML whose data.val to score on (default: the run's)")
    bc.add_argument("overrides", nargs="*", help="key=value overrides of that config")
    bc.add_argument("--reference", help="the full-precision model KL and agreement compare with (default: SOURCE; "
                                        "for a quantization-aware student, the model it was distilled from)")
    bc.add_argument("--presets", help="comma-separated (default: tinygptv_int8,minicpmv_nf4,bluelm_mixed,int8,nf4,int4,"
                                      "ternary); a ternary source applies them to --reference")
    bc.add_argument("--data", help="a held-out LLaVA-format JSON (processor from the model folder)")
    bc.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (median)")
    bc.add_argument("--repeats", type=int, default=5, help="timed prefills (median, after one warm-up)")
    bc.add_argument("--threads", type=int, default=2, help="torch threads of every measurement")
    bc.add_argument("--batch-size", type=int, default=32, help="held-out batch size of the quality pass")
    bc.add_argument("--keep", metavar="DIR", help="write the compressed folders here (default: a temporary folder)")
    bc.add_argument("--json", metavar="OUT", help="also write the rows and the machine to this JSON file")
    bc.add_argument("--plot", metavar="PNG", help="accuracy against stored model size")
    bc.set_defaults(func=_cmd_bench_compress)

    bt = bsub.add_parser("tokens", help="fewer image tokens: FLOPs and KV proxies, KV bytes, prefill and decode "
                                        "time (and accuracy) of the dense model, MoD students and reducers")
    bt.add_argument("source", nargs="?", help="a trained dense run or model (default: a random Llama decoder at "
                                              "real-size layer shapes)")
    bt.add_argument("config", nargs="?", help="experiment YAML whose data.val to score on (default: the run's)")
    bt.add_argument("overrides", nargs="*", help="key=value overrides of that config")
    bt.add_argument("--data", help="a held-out LLaVA-format JSON (processor from the model folder)")
    bt.add_argument("--mod", action="append", metavar="DIR", help="a mixture-of-depths student (run, stage or folder) "
                                                                 "to measure beside SOURCE; repeatable")
    bt.add_argument("--reduce", action="append", metavar="SPEC", help="a reducer applied to SOURCE; repeatable "
                                                                     "(default: attention_prune:layer=1,keep=0.5)")
    bt.add_argument("--repeats", type=int, default=3, help="timed prefills (median, after one warm-up)")
    bt.add_argument("--new-tokens", type=int, default=8, help="decode steps timed (median)")
    bt.add_argument("--threads", type=int, default=2, help="torch threads")
    bt.add_argument("--batch-size", type=int, default=32, help="held-out batch size of the accuracy pass")
    bt.add_argument("--hidden", type=int, default=4096, help="random decoder: width (default 4096, LLaVA-1.5-7B)")
    bt.add_argument("--intermediate", type=int, default=11008, help="random decoder: MLP width (default 11008)")
    bt.add_argument("--layers", type=int, default=4, help="random decoder: layers (default 4)")
    bt.add_argument("--heads", type=int, default=32, help="random decoder: attention heads (default 32)")
    bt.add_argument("--kv-heads", type=int, help="random decoder: KV heads (default: --heads)")
    bt.add_argument("--vocab", type=int, default=32000, help="random decoder: vocabulary (default 32000)")
    bt.add_argument("--image-tokens", type=int, default=576, help="random decoder: image tokens (default 576)")
    bt.add_argument("--text-tokens", type=int, default=60, help="random decoder: text tokens (default 60)")
    bt.add_argument("--json", metavar="OUT", help="also write the rows and the machine to this JSON file")
    bt.add_argument("--plot", metavar="PNG", help="accuracy (or prefill time) against the FLOPs proxy")
    bt.set_defaults(func=_cmd_bench_tokens)

    bs = bsub.add_parser("speculative", help="a draft model as a draft of TARGET: acceptance, mean accepted "
                                             "length, passes per token, cost ratio, decode speed, losslessness")
    bs.add_argument("source", help="the target: a run or model folder")
    bs.add_argument("config", nargs="?", help="experiment YAML whose data.val gives the prompts (default: the run's)")
    bs.add_argument("overrides", nargs="*", help="key=value overrides of that config")
    bs.add_argument("--draft", required=True, help="a run or model folder sharing the target's tokenizer, or "
                                                   "extract:SPEC (a MatFormer submodel of the target)")
    bs.add_argument("--draft-reduce", metavar="SPEC", help="a token reducer for the draft only (e.g. "
                                                          "attention_prune:layer=0,keep=0.25)")
    bs.add_argument("--data", help="a held-out LLaVA-format JSON (processor from the target folder)")
    bs.add_argument("--gamma", default="2,4", help="draft lengths, comma-separated (default 2,4)")
    bs.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    bs.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    bs.add_argument("--temperature", type=float, default=0.0, help="0: greedy, checked token for token; > 0: "
                                                                    "speculative sampling")
    bs.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens (both models alike)")
    bs.add_argument("--seed", type=int, default=0, help="sampling seed")
    bs.add_argument("--threads", type=int, default=2, help="torch threads")
    bs.add_argument("--json", metavar="OUT", help="also write the rows and the machine to this JSON file")
    bs.set_defaults(func=_cmd_bench_speculative)

    doc = sub.add_parser("doctor", help="versions, CUDA / Triton / mamba-ssm / bitsandbytes, kernel paths")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=_cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from workbench import console

    console.configure(args.verbose)
    try:
        check_kernels_package()
        args.func(args)
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except interrupt.Terminated:
        print("interrupted by SIGTERM", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
