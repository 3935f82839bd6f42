"""The `vlclassify` command line: backbones, methods, extract, fit, eval, predict, explain, serve, export, bench.

Each command parses its options, calls the library (`vlclassify.workflow` and friends) and prints:
results on standard output, notes and warnings on standard error."""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table

from .cli_options import (
    BACKBONE_OPT,
    BACKBONE_OPTS,
    CACHE_OPT,
    CACHE_WRITE_OPT,
    MODEL_ARG,
    OVERWRITE_OPT,
    PRESET_OPT,
    SKIP_BAD_OPT,
    _backbone,
    _cache,
    _note,
    console,
    err,
    parse_ints,
)
from .cli_service import register as register_service_commands
from .context import RunContext
from .errors import VLClassifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: few-shot comparison tables.")
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(no_args_is_help=True, help="Data: write a data spec out as images + a CSV manifest.")
app.add_typer(data_app, name="data")
cache_app = typer.Typer(no_args_is_help=True, help="The feature cache: what it holds, and trimming it.")
app.add_typer(cache_app, name="cache")
register_service_commands(app)


@app.callback()
def _consoles() -> None:
    """A pipe or a file is not a terminal: lines and tables are never wrapped to 80 columns there."""
    for c in (console, err):
        c.width = c.width if c.is_terminal else 1 << 16


def _command() -> str:
    return "vlclassify " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _stem(prefix: str, data: str) -> str:
    """`bench` output name from a data spec: `fewshot-` + the spec's last path part, sanitised."""
    last = data.split("?")[0].strip("/").split("/")[-1]
    return prefix + "".join(c if c.isalnum() or c in "-_" else "-" for c in last)


def _log(line: str) -> None:
    console.print(line)


def _report(table: str, paths) -> None:
    console.print(table)
    console.print(f"wrote {paths[0]} and {paths[1]}")


def _print_registry(registry, column: str) -> None:
    t = Table(column, "description")
    for n in registry.names():
        t.add_row(n, registry.describe(n))
    console.print(t)


def _load(model_dir: Path):
    from .methods import load_method

    return load_method(model_dir)


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from .backbones import BACKBONES

    _print_registry(BACKBONES, "backbone")


@app.command()
def methods(
    contract: bool = typer.Option(False, "--contract", help="Print the method contract table (markdown)."),
    presets: bool = typer.Option(False, "--presets", help="List the presets (`fit --preset NAME`)."),
) -> None:
    """List the registered methods (with --contract: the kinds of data each takes, and more)."""
    from .methods import METHODS
    from .methods.registry import contract_table
    from .protocols import PRESETS

    if contract:
        console.print(contract_table())
        return
    if presets:
        _print_registry(PRESETS, "preset")
    else:
        _print_registry(METHODS, "method")


@app.command()
def extract(
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Data spec: fashion-mnist, tuxpaint, a folder, a .csv/.jsonl manifest, a CoOp .json, or WebDataset "
        "tars ('shards/{00000..00099}.tar').",
    ),
    split: str | None = typer.Option(None, help="Only this split (train, val, test, all)."),
    spatial: bool = typer.Option(False, help="Also extract spatial tokens."),
    views: str = typer.Option("orig", help="Comma-separated views: orig, flip."),
    skip_bad: bool = SKIP_BAD_OPT,
    runtime: str = typer.Option("auto", help="Image trunk runtime: auto (ONNX Runtime when installed), torch, onnx."),
    device: str = typer.Option("auto", help="auto (CUDA when present; one GPU per torchrun process), cpu, cuda[:i]."),
    precision: str = typer.Option(
        "auto",
        help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, fp16, bf16, or int8 (the ONNX trunk quantised, "
        "CPU: its own feature space, see docs/benchmarks.md).",
    ),
    shard_rows: int = typer.Option(1024, min=1, help="Rows per store shard: what a killed run can lose per process."),
    batch_size: int = typer.Option(64, min=1, help="Images per encoder batch."),
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Extract features of every image into the per-image store (resumable; under torchrun, across ranks).

    torchrun --nnodes N --nproc_per_node P -m vlclassify extract --data ... splits the tars (or items)
    across the processes; a re-run after a kill continues where it stopped (docs/scaling.md)."""
    from .features import FeatureCache
    from .features.distributed import dist_env, extract_spec

    env, bb = dist_env(), _backbone(backbone, backbone_opt)
    cache = FeatureCache(cache_dir, shard_rows=shard_rows)
    stats = extract_spec(
        bb,
        data,
        split=split,
        views=tuple(views.split(",")),
        spatial=spatial,
        cache=cache,
        skip_bad=skip_bad,
        runtime=runtime,
        device=device,
        precision=precision,
        batch_size=batch_size,
        env=env,
    )
    if env.rank == 0:
        for line in _extract_summary(stats, bb, spatial, env):
            console.print(line)


def _extract_summary(stats: dict, bb, spatial: bool, env) -> list[str]:
    """What an extraction did: items and feature shapes per split, reused and new shards."""
    out = []
    for name, n in stats["sizes"].items():
        if name == "tars":
            out.append(f"{n} tar shard(s), {stats['inputs_skipped']} already done")
            continue
        msg = f"{name}: {n} items -> image ({n}, {bb.embed_dim}), pooled ({n}, {bb.pooled_dim})"
        out.append(msg + (", spatial tokens" if spatial else ""))
    reused = stats["seen"] - stats["computed"] - stats["bad"]
    msg = f"{stats['seen']} image(s) x view: {stats['computed']} extracted, {reused} already stored"
    if stats["bad"]:
        msg += f"; skipped {stats['bad']} unreadable image(s)"
    where = f" by {env.world_size} processes" if env.distributed else ""
    return out + [msg + f"; {stats['shards']} new shard(s){where}"]


@app.command()
def fit(
    method: str = typer.Option(..., "--method", "-m", help="Method name (see `vlclassify methods`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model (new or empty)."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Data spec (see `vlclassify extract --help`); zero-shot needs only --classes."
    ),
    classes: str | None = typer.Option(
        None, help="Classes as 'a,b,c' or a file with one `name` or `name: description` a line."
    ),
    shots: int | None = typer.Option(None, min=1, help="Few-shot: K training images per class (CoOp protocol)."),
    seed: int | None = typer.Option(None, help="Seed for few-shot sampling and splits (default 1, or the preset's)."),
    opt: list[str] = typer.Option([], "--opt", help="Method option key=value (repeatable; JSON values)."),
    preset: str | None = PRESET_OPT,
    precision: float | None = typer.Option(
        None, help="Single-label: answer only at this precision on validation (e.g. 0.9), else 'uncertain'."
    ),
    thresholds: str = typer.Option("per-class", help="Multi-label decision thresholds: per-class | global."),
    keep: float = typer.Option(
        0.95, min=0.5, max=1.0, help="Answer 'unknown' below the open-set score that keeps this share of validation."
    ),
    val_fraction: float = typer.Option(0.2, help="Validation fraction when the data has no val split."),
    test_fraction: float = typer.Option(0.2, help="Test fraction when the data has no splits at all."),
    skip_bad: bool = SKIP_BAD_OPT,
    stream: bool = typer.Option(
        False, "--stream", help="Read training batches from the feature store, not memory (larger-than-memory sets)."
    ),
    overwrite: bool = OVERWRITE_OPT,
    split_file: Path | None = typer.Option(
        None, "--split-file", help="Train/val items from this split.json (written by every fit) instead of sampling."
    ),
    export_onnx: bool = typer.Option(
        False, "--export-onnx", help="Also write the ONNX export that `predict` answers from without torch."
    ),
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Train a method, choose its decision rule on validation, save it (safetensors + JSON) to --out,
    with split.json: the items used."""
    from . import workflow
    from .data.classes import parse_classes
    from .errors import DataError
    from .features.distributed import dist_env
    from .trust.report import model_lines
    from .utils import check_overwrite, parse_options

    check_overwrite(out, overwrite, reads=[data] if data else [])
    if data is None and classes is None:
        raise DataError("fit: give --data (labelled images), or --classes for a zero-shot model")
    names, descriptions = parse_classes(classes) if classes else ([], {})
    ctx = RunContext(cache=_cache(cache_dir), skip_bad=skip_bad, stream=stream)
    record = {"command": _command(), "data_as_typed": data, "classes": classes}
    with _interrupted(f"nothing was saved at {out}; features extracted so far stay in the cache"):
        result = workflow.fit(
            data,
            method,
            backbone=_backbone(backbone, backbone_opt),
            options=parse_options(opt),
            classes=names,
            descriptions=descriptions,
            shots=shots,
            seed=seed,
            preset=preset,
            precision=precision,
            thresholds=thresholds,
            keep=keep,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_file=split_file,
            ctx=ctx,
            record=record,
            log=_log,
            note=_note,
        )
        if dist_env().rank != 0:  # under torchrun every rank holds the same fitted model: rank 0 saves it
            return
        if "auto" in result.model.fit_info:  # -m auto: every candidate's validation accuracy, the kept one starred
            from .methods.auto import auto_table

            console.print(
                "\n".join(["validation accuracy of each candidate:", *auto_table(result.model.fit_info["auto"])])
            )
        for k, v in result.validation.items():
            console.print(f"validation {k}: {100 * v:.2f}%")
        for task, rule in result.model.decisions.items():
            console.print(f"decision ({result.model.task_name(task)}): {rule.describe()}")
        for line in model_lines(result.model):
            console.print(line)
        result.save(out)
        console.print(f"saved to {out}")
        if export_onnx:
            import dataclasses

            from .export import export_beside, onnx_problem

            m = result.model
            why = onnx_problem(m)
            if why:
                _note(f"no ONNX export: {why}")
            else:
                with m.using(dataclasses.replace(ctx, progress=False)):
                    console.print(f"wrote {export_beside(m, out)}")


@contextmanager
def _interrupted(kept: str) -> Iterator[None]:
    """Ctrl-C: one line on standard error saying what was kept, and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        _note(f"interrupted: {kept}")
        raise typer.Exit(130) from None


@data_app.command("export")
def data_export(
    spec: str = typer.Argument(..., help="Data spec, e.g. tuxpaint, tuxpaint-composite, fashion-mnist."),
    out: Path = typer.Argument(..., help="New folder: images/ and labels.csv are written there."),
    limit: int | None = typer.Option(None, min=1, help="Keep the first N items of each split."),
) -> None:
    """Write a data spec out as a folder of images and a CSV manifest (a file like a user's own)."""
    from .data import load_data
    from .data.export import export_manifest

    path = export_manifest(load_data(spec), out, limit)
    console.print(f"wrote {path}")


@app.command()
def update(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit` (or update)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the updated model (new or empty)."),
    data: str | None = typer.Option(None, "--data", "-d", help="New labelled images (a data spec)."),
    classes: str | None = typer.Option(
        None, help="Classes to add: 'a,b,c' or a file with one `name` or `name: description` a line."
    ),
    val_fraction: float = typer.Option(0.2, help="Validation fraction of the new data when it has no val split."),
    seed: int = typer.Option(1, help="Seed for the split of the new data."),
    overwrite: bool = OVERWRITE_OPT,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Add examples and classes to a fitted model: without refitting for zero-shot, Tip-Adapter,
    the linear probe and iCAR; the other methods refit on the new data and say so."""
    from . import workflow
    from .data.classes import parse_classes
    from .errors import DataError
    from .utils import check_overwrite

    check_overwrite(out, overwrite, reads=[data] if data else [])
    if data is None and classes is None:
        raise DataError("update: give --data (new labelled images) and/or --classes (new class names)")
    names, descriptions = parse_classes(classes) if classes else ([], {})
    with _interrupted(f"nothing was saved at {out}; {model_dir} is as it was"):
        result = workflow.update(
            _load(model_dir),
            model_dir,
            data,
            classes=names,
            descriptions=descriptions,
            val_fraction=val_fraction,
            seed=seed,
            ctx=RunContext(cache=_cache(cache_dir)),
            record={"command": _command()},
        )
        u = result.info["update"]
        added = ", ".join(u["added_classes"]) or "none"
        console.print(
            f"update {result.model.name}: {u['how']}; classes added: {added} ({result.info['update_seconds']:.1f} s)"
        )
        result.save(out)
        console.print(f"saved to {out}")


@app.command("eval")
def evaluate(
    model_dir: Path = MODEL_ARG,
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec (default: the one the model was fitted on)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    out: Path | None = typer.Option(None, help="Write the metrics JSON here (default: MODEL_DIR/eval-<split>.json)."),
    plots: bool = typer.Option(
        False, "--plots", help="Also write PNG figures (ROC/PR curves; t-SNE and alignment matrix for DiCLS)."
    ),
    plots_dir: Path | None = typer.Option(None, help="Folder for --plots (default: MODEL_DIR/plots-<split>)."),
    unknown: str | None = typer.Option(
        None, "--unknown", help="Images of no known class (a folder or a data spec): AUROC of each open-set score."
    ),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Evaluate a saved model with its decision rule: top-1, per-class accuracy, macro-F1, confusion
    matrix, the answered share at a target precision (multi-label models: subset accuracy,
    per-label P/R/F1, mAP, ROC-AUC at the validation-chosen thresholds); calibration (ECE, NLL,
    Brier, calibrated and raw, and a reliability diagram); with --unknown, how well each open-set
    score tells those images from the evaluated ones."""
    from . import workflow
    from .trust.report import trust_lines, unknown_images

    ds, spec = workflow.eval_data(model_dir, data, split)
    m, ctx = _load(model_dir), RunContext(cache=_cache(cache_dir))
    report_at = out or model_dir / f"eval-{split}.json"
    odd = unknown_images(unknown, m.classnames) if unknown else None
    reliability = report_at.with_name(f"reliability-{split}.png")
    report = workflow.evaluate(m, ds, split=split, spec=spec, ctx=ctx, unknown=odd, reliability=reliability)
    report.metrics["model"] = str(model_dir)
    if report.tasks:
        tt = Table("task", "n", "accuracy", "recall@90%P", "image weight λ")
        for name, r in report.tasks.items():
            lam = f"{r['lambda']:.2f}" if "lambda" in r else "-"
            tt.add_row(name, str(r["n"]), f"{100 * r['accuracy']:.2f}%", f"{100 * r['recall@90P']:.2f}%", lam)
        console.print(tt)
    report_path, csv_path = report.save(report_at)
    console.print(f"wrote {csv_path}")
    t = Table("metric", "value")
    for k in report.headline:
        v = report.metrics[k]
        t.add_row(k, f"{100 * v:.2f}%" if isinstance(v, float) else str(v))
    console.print(t)
    console.print(f"decision: {m.decision().describe()}")
    for line in trust_lines(report.metrics):
        console.print(line)
    console.print(f"wrote {report_path} (all metrics, per-class scores, confusion matrix)")
    if plots:
        title = f"{m.name} on {spec} ({split})"
        for p in workflow.write_plots(m, report, plots_dir or model_dir / f"plots-{split}", title, ctx):
            console.print(f"wrote {p}")


@app.command()
def predict(
    model_dir: Path = MODEL_ARG,
    images: list[Path] = typer.Argument(None, help="Image files, or folders of images (every image in them)."),
    text: list[str] = typer.Option(
        [], "--text", help="Each image's paired text, in order (e.g. a product title; methods that take paired text)."
    ),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Predict every item of a data spec (its images, texts and tasks)."
    ),
    top: int = typer.Option(5, min=1, help="How many classes to print per image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line instead of text."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Also write the predictions as a CSV table."),
    precision: str = typer.Option(
        "fp32", help="fp32, or int8 (the image trunk quantised: see docs/benchmarks.md for when it pays)."
    ),
    skip_bad: bool = SKIP_BAD_OPT,
    cache_write: bool = CACHE_WRITE_OPT,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Print each image's decision (the class, 'uncertain', or the labels found) and top scores.

    A model that exports to ONNX answers from its export beside the model (made at the first
    predict, again when stale or damaged) in ONNX Runtime, without importing torch; --cache-write
    predicts with torch instead, to store the new images' features."""
    from . import workflow
    from .errors import ConfigError, DataError
    from .onnx_predict import OnnxModel, export_problem_here, graph_path

    images = list(images or [])
    if bool(images) == bool(data):
        raise DataError(
            "predict: give image files or --data, not both" if images else "predict: give image files or --data"
        )
    graph_path(model_dir, precision)  # an unknown precision fails before any work
    if cache_write and precision != "fp32":
        raise ConfigError(f"--precision {precision} runs the ONNX export, and --cache-write predicts with torch")
    items, truth = workflow.predict_items(images, text, data)
    onnx = None
    if cache_write:  # the export never reads or writes the feature store: torch computes and stores the features
        m = _load(model_dir)
    elif export_problem_here(model_dir, precision) is None:
        onnx = OnnxModel(model_dir, precision)
    else:
        m = _exported_or_torch(model_dir, precision, cache_dir)
        onnx = OnnxModel(model_dir, precision) if isinstance(m, Path) else None
    if onnx is not None:  # an exported model: it reads images only
        if any(it.text for it in items):
            _note(f"note: {onnx.method} reads images only; the texts are ignored")
        results = onnx.predict_results(items, top=top, skip_bad=skip_bad)
    else:
        if ignored := workflow.ignored_texts(m, items):
            _note(f"note: {ignored}")
        ctx = RunContext(cache=_cache(cache_dir), progress=False, skip_bad=skip_bad, cache_write=cache_write)
        results = workflow.predict(m, items, top=top, ctx=ctx)
    for r in results:
        if as_json:
            print(json.dumps(r.to_dict()), flush=True)
        else:
            console.print(workflow.format_prediction(r))
    if len(results) < len(items):
        _note(f"note: skipped {len(items) - len(results)} unreadable image(s) of {len(items)}")
    if csv_out is not None:
        _note(f"wrote {workflow.write_predictions_csv(csv_out, results, truth)}")


def _exported_or_torch(model_dir: Path, precision: str, cache_dir: Path | None):
    """Load the model (torch) and make its export beside it -> the graph's Path; or, for a model
    that cannot be exported, say so and return the loaded Method (int8 needs the export)."""
    from .errors import ConfigError
    from .export import export_beside, onnx_problem

    m = _load(model_dir)
    why = onnx_problem(m)
    if why is None:
        with m.using(RunContext(cache=_cache(cache_dir), cache_write=False, progress=False)):
            return export_beside(m, model_dir, precision)
    if precision != "fp32":
        raise ConfigError(f"--precision {precision} runs an ONNX export of the model, and {why}")
    _note(f"note: predicting with torch: {why}")
    return m


@app.command()
def explain(
    model_dir: Path = typer.Argument(
        ..., help="A folder written by `vlclassify fit` (a method with attention, e.g. vt-clip)."
    ),
    image: Path = typer.Argument(..., help="Image file."),
    class_: str | None = typer.Option(
        None, "--class", help="Class name (or text token) to explain (default: the predicted class)."
    ),
    text: str | None = typer.Option(
        None, "--text", help="The image's paired text (image+text methods: cma-clip explains a token of it)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write: the attention map over the image."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Draw where a class's text attends in an image, as a heatmap PNG."""
    from . import workflow

    heat, target = workflow.explain(
        _load(model_dir), image, text, class_, out, ctx=RunContext(cache=_cache(cache_dir), progress=False)
    )
    console.print(f"{image}: attention of {target!r} over a {heat.shape[0]}x{heat.shape[1]} grid -> {out}")


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit`."),
    format_: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Graph file (default: MODEL_DIR/model.onnx)."),
    check: list[Path] = typer.Option(
        [], "--check", help="Image files to check the graph against the model on (repeatable; default: generated)."
    ),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Export a fitted model to one ONNX graph (pixels -> class probabilities) + a JSON sidecar."""
    from .errors import ConfigError
    from .export import export_onnx
    from .methods import load_method

    if format_ != "onnx":
        raise ConfigError(f"--format {format_!r} is not supported; formats: onnx")
    m = load_method(model_dir)
    with m.using(RunContext(cache=_cache(cache_dir), progress=False)):
        result = export_onnx(
            m, out or model_dir / "model.onnx", check_images=[str(p) for p in check] or None, model_dir=model_dir
        )
    console.print(
        f"wrote {result.graph} and {result.sidecar}: {result.inputs} -> probabilities of {len(m.classnames)} "
        f"classes; checked on {result.checked} image(s), max |difference| {result.max_diff:.2e}"
    )


@bench_app.command("fewshot")
def bench_fewshot(
    data: str = typer.Option("fashion-mnist", "--data", "-d", help="Data spec."),
    methods_: str = typer.Option(
        "zero-shot,linear-probe",
        "--methods",
        help="Comma-separated methods; options in brackets: cmm[alpha=1.0;no_triplet=true].",
    ),
    shots: str = typer.Option("1,2,4,8,16", help="Comma-separated shots."),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds (default 1,2,3, or the preset's)."),
    test_limit: int | None = typer.Option(
        None, help="Score on a fixed stratified subset of this many test images (faster)."
    ),
    min_per_class: int | None = typer.Option(
        None,
        "--min-per-class",
        help="Drop classes with fewer images than this (tiny classes cannot give K shots + validation + test).",
    ),
    out: Path = typer.Option(Path("."), help="Folder for the JSON + markdown table (default: the current one)."),
    name: str | None = typer.Option(None, help="File name stem (default: fewshot-<data>)."),
    preset: str | None = PRESET_OPT,
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Few-shot comparison: methods x shots x seeds, mean ± std, fit times."""
    from .fewshot import markdown_table, parse_method_specs, run_fewshot, write_results
    from .protocols import resolve_presets
    from .workflow import absolute_spec

    specs = parse_method_specs(methods_)
    presets = resolve_presets(preset, absolute_spec(data))
    for line in presets.log(data, list(dict.fromkeys(s.method for s in specs))):
        _log(line)
    result = run_fewshot(
        _backbone(backbone, backbone_opt),
        data,
        specs,
        parse_ints(shots, "shots"),
        parse_ints(seeds, "seeds") if seeds else list(presets.seeds or (1, 2, 3)),
        test_limit=test_limit,
        cache=_cache(cache_dir),
        log=_log,
        min_per_class=min_per_class,
        presets=presets,
    )
    _report(markdown_table(result), write_results(result, out, name or _stem("fewshot-", data), command=_command()))


def _bytes(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _parse_amount(text: str, units: Mapping[str, float], what: str) -> float:
    import re

    from .errors import ConfigError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in units:
        raise ConfigError(f"{what} {text!r}: expected a number with a unit ({', '.join(u for u in units if u)})")
    return float(m.group(1)) * units[unit]


@cache_app.command("info")
def cache_info(
    verify: bool = typer.Option(False, "--verify", help="Check every shard's checksum (damaged ones are dropped)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Show the cache: size, rows and shards per backbone/view/runtime, per-dataset entries, leftovers."""
    import time

    info = _cache(cache_dir).info(verify=verify)
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print(f"cache: {info['root']}")
    t = Table("kind", "backbone", "view", "runtime", "rows", "shards", "size", "last used", title="feature store")
    for s in info["spaces"]:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["used"])) if s["used"] else "-"
        t.add_row(
            s["kind"],
            s["backbone"],
            s["view"],
            s["runtime"],
            str(s["rows"]),
            str(s["shards"]),
            _bytes(s["bytes"]),
            used,
        )
    console.print(t)
    console.print(
        f"store {_bytes(info['store_bytes'])} in {sum(s['shards'] for s in info['spaces'])} shard(s); "
        f"{info['entries']} per-dataset entr(y/ies) {_bytes(info['entries_bytes'])} "
        f"({info['stale_entries']} from an older cache version); "
        f"leftovers of interrupted writes: {info['leftovers']} ({_bytes(info['leftovers_bytes'])}); "
        f"ONNX trunk exports {_bytes(info['onnx_bytes'])}"
    )
    if verify:
        console.print(f"verified: {len(info['damaged'])} damaged shard(s) dropped")


@cache_app.command("prune")
def cache_prune(
    older_than: str | None = typer.Option(None, help="Remove what was last used longer ago than this: 30d, 12h, 2w."),
    max_size: str | None = typer.Option(None, help="Then remove the least recently used until the cache fits: 10G."),
    backbone: str | None = typer.Option(None, help="Remove everything made with this backbone name."),
    all_: bool = typer.Option(False, "--all", help="Remove every feature (ONNX trunk exports stay)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would go."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Trim the cache (always: older-version entries, unreferenced shards, stale temp files)."""
    secs = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    size = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
    size |= {"t": 1024**4, "tb": 1024**4}
    r = _cache(cache_dir).prune(
        older_than=_parse_amount(older_than, secs, "--older-than") if older_than else None,
        max_bytes=int(_parse_amount(max_size, size, "--max-size")) if max_size else None,
        backbone=backbone,
        everything=all_,
        dry_run=dry_run,
    )
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {r['shards']} shard(s) ({r['rows']} rows), {r['entries']} entr(y/ies), "
        f"{r['leftovers']} leftover(s): {_bytes(r['bytes'])}"
    )


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """The `vlclassify` entry point: a VLClassifyError becomes a one-line `error: ...` and exit code 2, no
    traceback."""
    warnings.filterwarnings("default")
    warnings.formatwarning = _one_line_warning  # user-facing warnings, not source lines
    try:
        app(standalone_mode=True)
    except VLClassifyError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)


if __name__ == "__main__":
    main()
