"""The `vlclassify` command line: backbones, methods, extract, fit, eval, predict, explain, serve, export, bench."""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .context import RunContext
from .errors import VLClassifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: few-shot comparison tables.")
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(no_args_is_help=True, help="Data: write a data spec out as images + a CSV manifest.")
app.add_typer(data_app, name="data")
cache_app = typer.Typer(no_args_is_help=True, help="The feature cache: what it holds, and trimming it.")
app.add_typer(cache_app, name="cache")
console = Console()

BACKBONE_OPT = typer.Option("effnet-minilm", "--backbone", "-b", help="Backbone name (see `vlclassify backbones`).")
BACKBONE_OPTS = typer.Option([], "--backbone-opt", help="Backbone option key=value (repeatable), e.g. path=./clip.")
CACHE_OPT = typer.Option(
    None, "--cache-dir", help="Feature cache folder (default $VLCLASSIFY_CACHE or ~/.cache/vlclassify)."
)
PRESET_OPT = typer.Option(
    None,
    "--preset",
    help="Settings by name, comma-separated (see `vlclassify methods --presets`); a CoOp split file applies its "
    "dataset's preset (coop-<dataset>) unless 'none'.",
)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (`--opt`, `--backbone-opt`) -> dict; values are JSON when they parse, else strings."""
    from .errors import DataError

    out: dict[str, Any] = {}
    for p in pairs:
        if not p.strip():
            continue
        k, eq, v = p.partition("=")
        if not eq:
            raise DataError(f"option {p!r} must be key=value")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def parse_method_specs(text: str):
    """`zero-shot,linear-probe,cmm[no_triplet=true]` -> MethodSpecs (options in brackets, `;`-separated)."""
    from .bench.fewshot import MethodSpec
    from .errors import DataError

    specs, depth, cur = [], 0, ""
    for ch in text + ",":
        if ch == "," and depth == 0:
            if cur.strip():
                specs.append(cur.strip())
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    out = []
    for s in specs:
        name, _, rest = s.partition("[")
        if rest and not rest.endswith("]"):
            raise DataError(f"method spec {s!r}: options must be in brackets, e.g. cmm[alpha=1.0;steps=500]")
        out.append(MethodSpec(label=s, method=name, options=parse_options(rest[:-1].split(";")) if rest else {}))
    return out


def parse_ints(text: str, what: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; a value that is not a positive integer is a one-line error naming it."""
    from .errors import DataError

    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise DataError(f"--{what}: {part.strip()!r} is not an integer (expected e.g. 1,2,4)") from None
        out.append(v)
    return out


def _backbone(name: str, opts: list[str]):
    from .backbones import create_backbone

    return create_backbone(name, **parse_options(opts))


def _cache(cache_dir: Path | None):
    from .features import FeatureCache

    return FeatureCache(cache_dir)


def _command() -> str:
    return "vlclassify " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _stem(prefix: str, data: str) -> str:
    """`bench` output name from a data spec: `fewshot-` + the spec's last path part, sanitised."""
    last = data.split("?")[0].strip("/").split("/")[-1]
    return prefix + "".join(c if c.isalnum() or c in "-_" else "-" for c in last)


def _log(line: str) -> None:
    console.print(line, highlight=False, markup=False, soft_wrap=True)  # method specs contain [brackets]


def _report(table: str, paths) -> None:
    console.print(table, highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {paths[0]} and {paths[1]}", markup=False, soft_wrap=True)


def _print_registry(registry, column: str) -> None:
    t = Table(column, "description")
    for n in registry.names():
        t.add_row(n, registry.describe(n))
    console.print(t)


def _log_presets(presets, data: str | None, methods: list[str]) -> None:
    """Which presets apply and why (named, or the data's file name), and what they set."""
    for p in presets.presets:
        why = "named"
        if p.name == presets.automatic and data:
            why = f"automatic for {Path(data.partition('?')[0]).name}; --preset none turns it off"
        _log(f"preset {p.name} ({why}): {p.description}")
    if presets.presets:
        for m in methods:
            _log(f"  {m} options set: {', '.join(sorted(presets.options(m))) or 'none'}")
        _log(f"  protocol: {presets.protocol.describe()}")


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

    if contract:
        console.print(contract_table(), markup=False, highlight=False, soft_wrap=True)
        return
    if presets:
        from .methods.presets import PRESETS

        _print_registry(PRESETS, "preset")
        return
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
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (counted) instead of failing."),
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

    env = dist_env()
    bb = _backbone(backbone, backbone_opt)
    stats = extract_spec(
        bb,
        data,
        split=split,
        views=tuple(views.split(",")),
        spatial=spatial,
        cache=FeatureCache(cache_dir, shard_rows=shard_rows),
        skip_bad=skip_bad,
        runtime=runtime,
        device=device,
        precision=precision,
        batch_size=batch_size,
        env=env,
    )
    if env.rank != 0:
        return
    sizes = stats["sizes"]
    for name, n in sizes.items():
        if name == "tars":
            console.print(f"{n} tar shard(s), {stats['inputs_skipped']} already done")
            continue
        msg = f"{name}: {n} items -> image ({n}, {bb.embed_dim}), pooled ({n}, {bb.pooled_dim})"
        console.print(msg + (", spatial tokens" if spatial else ""))
    reused = stats["seen"] - stats["computed"] - stats["bad"]
    msg = f"{stats['seen']} image(s) x view: {stats['computed']} extracted, {reused} already stored"
    if stats["bad"]:
        msg += f"; skipped {stats['bad']} unreadable image(s)"
    where = f" by {env.world_size} processes" if env.distributed else ""
    console.print(msg + f"; {stats['shards']} new shard(s){where}", markup=False, soft_wrap=True)


def _splits_for(
    data: str,
    shots: int | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    split_file: Path | None = None,
    protocol: dict | None = None,
):
    """A fit's splits again, from what its fit.json recorded (`protocol`: the presets' data side)."""
    from .data import plan_splits
    from .data.plan import DEFAULT, Protocol

    proto = Protocol(**protocol) if protocol else DEFAULT
    return plan_splits(data, shots, seed, val_fraction, test_fraction, split_file, proto)


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
    val_fraction: float = typer.Option(0.2, help="Validation fraction when the data has no val split."),
    test_fraction: float = typer.Option(0.2, help="Test fraction when the data has no splits at all."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (counted) instead of failing."),
    stream: bool = typer.Option(
        False, "--stream", help="Read training batches from the feature store, not memory (larger-than-memory sets)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the model in a non-empty --out folder."),
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
    from .data import plan_splits, write_split_file
    from .data.classes import parse_classes
    from .errors import DataError
    from .methods import create_method
    from .methods.presets import resolve_presets
    from .utils import atomic_path, write_json

    _check_out(out, overwrite)
    if data is None and classes is None:
        raise DataError("fit: give --data (labelled images), or --classes for a zero-shot model")
    names, descriptions = parse_classes(classes) if classes else ([], {})
    presets = resolve_presets(preset, _absolute_spec(data) if data else None)
    seed = seed if seed is not None else (presets.seeds or (1,))[0]
    _log_presets(presets, data, [method])
    bb = _backbone(backbone, backbone_opt)
    m = create_method(method, bb, **{**presets.options(method), **parse_options(opt)})
    ctx = RunContext(cache=_cache(cache_dir), skip_bad=skip_bad, stream=stream)
    splits: dict = {}
    if data is None:
        if not hasattr(m, "set_classes") or m.trains_on_images:
            raise DataError(f"fit: {method} learns from images; give --data (names alone make a zero-shot model)")
        with m.using(ctx):
            m.set_classes(names, descriptions)
        console.print(f"{method}: {len(names)} classes by name, no images")
    else:
        spec = _absolute_spec(data)
        splits = plan_splits(spec, shots, seed, val_fraction, test_fraction, split_file, presets.protocol)
        train = splits["train"]
        if names and names != train.classnames:
            raise DataError(f"--classes {names[:5]}... do not match the data's classes {train.classnames[:5]}...")
        m.check_data(train)  # a kind the method does not take stops here, before any extraction
        console.print(f"fit {method} on {data}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
        for name in ("val", "test"):
            if name in splits and not len(splits[name]):
                console.print(
                    f"warning: no images are left for {name} ({len(train)} train)"
                    + (f"; every class has at most {shots} images" if shots else ""),
                    markup=False,
                )
        if descriptions and hasattr(m, "descriptions"):
            m.descriptions = descriptions
        m.fit(train, splits.get("val"), ctx=ctx, precision=precision, thresholds=thresholds)
    from .features.distributed import dist_env

    if dist_env().rank != 0:  # under torchrun every rank holds the same fitted model: rank 0 reports and saves it
        return
    for note in m.fit_info.get("ignored", []):
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    if presets.presets:
        m.fit_info["preset"] = presets.record([method])  # config.json records it with the fit
    info: dict[str, Any] = {
        "command": _command(),
        "method": method,
        "data": _absolute_spec(data) if data else None,
        "data_as_typed": data,
        "classes": classes,
        "shots": shots,
        "seed": seed,
        "preset": presets.record([method]) if presets.presets else None,
        "split_file": str(split_file) if split_file else None,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "sizes": {k: len(v) for k, v in splits.items()},
        "decisions": {t: r.describe() for t, r in m.decisions.items()},
        "fit_info": m.fit_info,
    }
    val = splits.get("val")
    if val is not None and len(val):
        info["validation"] = _scores(m, val, ctx)
        for k, v in info["validation"].items():
            console.print(f"validation {k}: {100 * v:.2f}%")
    for task, rule in m.decisions.items():
        console.print(f"decision ({m.task_name(task)}): {rule.describe()}", markup=False, soft_wrap=True)
    with atomic_path(out, is_dir=True) as tmp:  # the new model replaces an old one whole, never mixed
        m.save_pretrained(tmp)
        if splits and data is not None:  # splits come from --data
            write_split_file(tmp / "split.json", splits, _absolute_spec(data))
        write_json(tmp / "fit.json", info)
    console.print(f"saved to {out}")
    if export_onnx:
        import dataclasses

        from .export import export_beside, onnx_problem

        why = onnx_problem(m)
        if why:
            console.print(f"note: no ONNX export: {why}", markup=False, soft_wrap=True)
        else:
            with m.using(dataclasses.replace(ctx, progress=False)):
                console.print(f"wrote {export_beside(m, out)}")


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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the model in a non-empty --out folder."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Add examples and classes to a fitted model: without refitting for zero-shot, Tip-Adapter,
    the linear probe and iCAR; the other methods refit on the new data and say so."""
    import time

    from .data.classes import parse_classes
    from .errors import DataError
    from .methods import load_method
    from .utils import atomic_path, read_json, write_json

    _check_out(out, overwrite)
    if data is None and classes is None:
        raise DataError("update: give --data (new labelled images) and/or --classes (new class names)")
    names, descriptions = parse_classes(classes) if classes else ([], {})
    m = load_method(model_dir)
    splits = _splits_for(_absolute_spec(data), None, seed, val_fraction, 0.0) if data else {}
    t0 = time.perf_counter()
    ctx = RunContext(cache=_cache(cache_dir))
    m.update(splits.get("train"), splits.get("val"), classes=names, descriptions=descriptions, ctx=ctx)
    seconds = time.perf_counter() - t0
    u = m.fit_info["update"]
    console.print(
        f"update {m.name}: {u['how']}; classes added: {', '.join(u['added_classes']) or 'none'} ({seconds:.1f} s)",
        markup=False,
        soft_wrap=True,
    )
    old = read_json(model_dir / "fit.json") if (model_dir / "fit.json").exists() else {}
    info = {
        **old,
        "data": None,
        "command": _command(),
        "updated_from": str(model_dir.resolve()),
        "update": u,
        "update_seconds": round(seconds, 3),
        "update_data": _absolute_spec(data) if data else None,
        "decisions": {t: r.describe() for t, r in m.decisions.items()},
        "fit_info": m.fit_info,
    }
    with atomic_path(out, is_dir=True) as tmp:
        m.save_pretrained(tmp)
        write_json(tmp / "fit.json", info)
    console.print(f"saved to {out}")


def _check_out(out: Path, overwrite: bool) -> None:
    """--out must be a new or empty folder (or --overwrite): checked before any work."""
    from .errors import DataError

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--out {out}: folder is not empty; pass --overwrite to replace what it holds")


def _absolute_spec(spec: str) -> str:
    """A data spec whose path is absolute (fit.json then works from any directory); built-ins unchanged."""
    base, sep, query = spec.partition("?")
    p = Path(base)
    return str(p.resolve()) + sep + query if p.exists() else spec


def _scores(m, ds, ctx: RunContext) -> dict[str, float]:
    """Headline validation numbers: accuracy (or mAP and micro-F1 for multi-label models)."""
    from .metrics import accuracy, mean_average_precision, multilabel_report

    probs = m.predict_proba(ds, ctx=ctx)
    if m.multilabel:
        rep = multilabel_report(ds.multi_hot(), probs, m.classnames, m.decision().thresholds)
        return {"mAP": mean_average_precision(ds.multi_hot(), probs), "micro-F1": rep["micro_f1"]}
    return {"accuracy": accuracy(ds.labels(), probs)}


@app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit`."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec (default: the one the model was fitted on)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    out: Path | None = typer.Option(None, help="Write the metrics JSON here (default: MODEL_DIR/eval-<split>.json)."),
    plots: bool = typer.Option(
        False, "--plots", help="Also write PNG figures (ROC/PR curves; t-SNE and alignment matrix for DiCLS)."
    ),
    plots_dir: Path | None = typer.Option(None, help="Folder for --plots (default: MODEL_DIR/plots-<split>)."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Evaluate a saved model with its decision rule: top-1, per-class accuracy, macro-F1, confusion
    matrix, the answered share at a target precision (multi-label models: subset accuracy,
    per-label P/R/F1, mAP, ROC-AUC at the validation-chosen thresholds)."""
    from .errors import DataError
    from .methods import load_method
    from .metrics import classification_report
    from .utils import read_json, write_json

    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: no such model folder")
    info = read_json(model_dir / "fit.json") if (model_dir / "fit.json").exists() else {}
    fitted_on = info.get("data")
    data = _absolute_spec(data) if data else fitted_on
    if not data:
        raise DataError(f"{model_dir}: no data to evaluate on (no fit.json, or a model fitted by name); pass --data")
    if data != fitted_on or split == "all":
        ds = _rows_of(data, split)  # another file (e.g. the test images): every row it has for `split`
    else:
        own = model_dir / "split.json"  # the fit's own items, when evaluating on the data it was fitted on
        splits = _splits_for(
            data,
            info.get("shots"),
            info.get("seed", 1),
            info.get("val_fraction", 0.2),
            info.get("test_fraction", 0.2),
            own if own.exists() else None,
            (info.get("preset") or {}).get("protocol"),
        )
        if split not in splits:
            raise DataError(f"{data}: no {split!r} split (have: {', '.join(splits)}, all)")
        ds = splits[split]
    if not len(ds):
        raise DataError(f"{data}: the {split!r} split is empty (too few images per class for this split)")
    m = load_method(model_dir)
    ctx = RunContext(cache=_cache(cache_dir))
    if ds.classnames != m.classnames:
        raise DataError(f"{data}: classes {ds.classnames[:5]}... do not match the model's {m.classnames[:5]}...")
    probs = m.predict_proba(ds, ctx=ctx)
    rule = m.decision()
    if ds.multilabel or m.multilabel:
        from .metrics import multilabel_report

        thresholds = rule.thresholds if rule.thresholds is not None else float("inf")  # argmax: no label passes
        report = multilabel_report(ds.multi_hot(), probs, m.classnames, thresholds)
        keys: tuple[str, ...] = (
            "n",
            "subset_accuracy",
            "label_accuracy",
            "micro_f1",
            "macro_f1",
            "macro_mAP",
            "micro_mAP",
            "macro_roc_auc",
        )
    else:
        report = classification_report(ds.labels(), probs, m.classnames)
        keys = ("n", "top1", "top5", "mean_per_class_accuracy", "macro_f1")
        if rule.kind == "precision":
            decided = rule.apply(probs)
            answered = decided >= 0
            report["answered"] = float(answered.mean())
            report["precision_answered"] = (
                float((decided[answered] == ds.labels()[answered]).mean()) if answered.any() else float("nan")
            )
            keys += ("answered", "precision_answered")
    report["decision"] = {"rule": rule.describe(), **rule.to_dict()}
    if hasattr(m, "task_report"):  # multi-task methods (CMA-CLIP): accuracy, recall at 90% precision, λ per task
        with m.using(ctx):
            report["tasks"] = m.task_report(ds)
        tt = Table("task", "n", "accuracy", "recall@90%P", "image weight λ")
        for name, r in report["tasks"].items():
            tt.add_row(
                name, str(r["n"]), f"{100 * r['accuracy']:.2f}%", f"{100 * r['recall@90P']:.2f}%", f"{r['lambda']:.2f}"
            )
        console.print(tt)
        for note in getattr(m, "notes", []):
            console.print(f"note: {note}")
    report.update({"data": data, "split": split, "model": str(model_dir)})
    report_path = out or model_dir / f"eval-{split}.json"
    write_json(report_path, report)
    _write_predictions_csv(
        report_path.with_name(f"predictions-{split}.csv"),
        m.predict_results(ds, top=3, ctx=ctx),
        [";".join(ds.classnames[c] for c in _true(ds, i)) for i in range(len(ds))],
    )
    t = Table("metric", "value")
    for k in keys:
        v = report[k]
        t.add_row(k, f"{100 * v:.2f}%" if isinstance(v, float) else str(v))
    console.print(t)
    console.print(f"decision: {rule.describe()}", markup=False, soft_wrap=True)
    console.print(
        f"wrote {report_path} (all metrics, per-class scores, confusion matrix)", markup=False, soft_wrap=True
    )
    if plots:
        from .plots.report import TaskScores, write_eval_plots

        tasks = None
        if len(m.task_classes) > 1:  # every task gets its own figure, named in its title
            per_task = m.task_probs(ds, ctx=ctx)
            tasks = {t: TaskScores(c, m.task_targets(ds, t), per_task[t]) for t, c in m.task_classes.items()}
        folder = plots_dir or model_dir / f"plots-{split}"
        with m.using(ctx):
            for p in write_eval_plots(m, ds, probs, folder, title=f"{m.name} on {data} ({split})", tasks=tasks):
                console.print(f"wrote {p}")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit`."),
    images: list[Path] = typer.Argument(None, help="Image files."),
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
        "fp32", help="fp32, or int8 (the image trunk quantised: faster on CPU, see docs/benchmarks.md)."
    ),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Print each image's decision (the class, 'uncertain', or the labels found) and top scores.

    A model that exports to ONNX answers from its export beside the model (made at the first
    predict, again when stale or damaged) in ONNX Runtime, without importing torch."""
    from .data.items import Item
    from .data.loaders import file_key
    from .errors import DataError
    from .onnx_predict import OnnxModel, export_problem_here, graph_path

    images = list(images or [])
    if bool(images) == bool(data):
        raise DataError(
            "predict: give image files or --data, not both" if images else "predict: give image files or --data"
        )
    if text and len(text) != len(images):
        raise DataError(f"predict: {len(text)} --text value(s) for {len(images)} image(s); give one per image")
    graph_path(model_dir, precision)  # an unknown precision fails before any work
    truth: list[str] | None = None  # the main task's true label(s) per item, for the CSV, when the data has them
    if data:
        from .data import load_data

        parts = load_data(data)
        items = [it for ds in parts.values() for it in ds.items]
        truth = [";".join(ds.classnames[c] for c in _true(ds, i)) for ds in parts.values() for i in range(len(ds))]
        if not any(truth):
            truth = None
    else:
        for p in images:
            if not p.is_file():
                raise DataError(f"{p}: image file not found")
        texts: list[str | None] = list(text) if text else [None] * len(images)
        items = [Item(image=str(p), text=t or None, key=file_key(p)) for p, t in zip(images, texts)]
    onnx = None if export_problem_here(model_dir, precision) else OnnxModel(model_dir, precision)
    m = None
    if onnx is None:
        m = _exported_or_torch(model_dir, precision, cache_dir)
        onnx = OnnxModel(model_dir, precision) if isinstance(m, Path) else None
    if onnx is not None:  # an exported model: it reads images only
        if any(it.text for it in items):
            console.print(f"note: {onnx.method} reads images only; the texts are ignored", markup=False)
        results = onnx.predict_results(items, top=top)
    else:
        from .data import Dataset
        from .methods.base import TEXT

        assert m is not None and not isinstance(m, Path)
        ctx = RunContext(cache=_cache(cache_dir), progress=False)
        if any(it.text for it in items) and TEXT not in m.takes():
            console.print(f"note: {m.name} reads images only; the texts are ignored", markup=False)
        results = m.predict_results(Dataset(items=items, classnames=m.classnames, name="predict"), top=top, ctx=ctx)
    for r in results:
        if as_json:
            print(json.dumps(r.to_dict()), flush=True)
        else:
            console.print(_result_line(r), markup=False, highlight=False, soft_wrap=True)
    if csv_out is not None:
        _write_predictions_csv(csv_out, results, truth)


def _exported_or_torch(model_dir: Path, precision: str, cache_dir: Path | None):
    """Load the model (torch) and make its export beside it -> the graph's Path; or, for a model
    that cannot be exported, say so and return the loaded Method (int8 needs the export)."""
    from .errors import ConfigError
    from .export import export_beside, onnx_problem
    from .methods import load_method

    m = load_method(model_dir)
    why = onnx_problem(m)
    if why is None:
        with m.using(RunContext(cache=_cache(cache_dir), cache_write=False, progress=False)):
            return export_beside(m, model_dir, precision)
    if precision != "fp32":
        raise ConfigError(f"--precision {precision} runs an ONNX export of the model, and {why}")
    console.print(f"note: predicting with torch: {why}", markup=False, soft_wrap=True)
    return m


def _decision_text(t) -> str:
    if t.uncertain:
        return "uncertain"
    if not t.labels:
        return "no label found"
    scores = dict(t.scores)
    return ", ".join(f"{c} ({100 * scores[c]:.1f}%)" if c in scores else c for c in t.labels)


def _result_line(r) -> str:
    """`image: decision | top scores` (one line per task for multi-task models, with modality weights)."""
    lines = []
    for task, t in r.tasks.items():
        head = r.item if len(r.tasks) == 1 else f"  {task}"
        line = f"{head}: {_decision_text(t)}  | " + ", ".join(f"{c} {100 * s:.1f}%" for c, s in t.scores)
        if r.modality_weights and task in r.modality_weights:
            w = r.modality_weights[task]
            line += f"  [weights: image {w['image']:.2f}, text {w['text']:.2f}]"
        lines.append(line)
    return "\n".join(([r.item] if len(r.tasks) > 1 else []) + lines)


def _write_predictions_csv(path: Path, results, truth: list[str] | None = None) -> None:
    """One row per item and task: item, task, decision, top scores (label:score;...), and the true
    label(s) of the main task when known."""
    import csv

    from .utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "task", "decision", "uncertain", "scores"] + (["truth"] if truth is not None else []))
        for i, r in enumerate(results):
            for k, (task, t) in enumerate(r.tasks.items()):
                row = [
                    r.item,
                    task,
                    ";".join(t.labels),
                    int(t.uncertain),
                    ";".join(f"{c}:{s:.6f}" for c, s in t.scores),
                ]
                w.writerow(row + ([truth[i] if k == 0 else ""] if truth is not None else []))
    console.print(f"wrote {path}")


def _true(ds, i: int) -> list[int]:
    it = ds.items[i]
    return list(it.labels) if it.labels is not None else ([it.label] if it.label is not None and it.label >= 0 else [])


def _rows_of(data: str, split: str):
    """The rows of `data` for `split`: a file without splits gives all of its rows; `all` joins every split."""
    import dataclasses

    from .data import load_data
    from .errors import DataError

    raw = load_data(data)
    if split in raw:
        return raw[split]
    if "all" in raw and split in ("test", "all"):
        return raw["all"]
    if split == "all":
        first = next(iter(raw.values()))
        return dataclasses.replace(first, items=[it for ds in raw.values() for it in ds.items])
    raise DataError(f"{data}: no {split!r} split (have: {', '.join(raw)}, all)")


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
    from .data.images import load_image
    from .errors import DataError
    from .methods import load_method
    from .plots.heatmap import save_heatmap

    if not image.is_file():
        raise DataError(f"{image}: image file not found")
    m = load_method(model_dir)
    ctx = RunContext(cache=_cache(cache_dir), progress=False)
    from .data import Item

    item = Item(image=str(image), text=text, key=str(image))
    heat = m.explain(item if text else str(image), class_, ctx=ctx)
    if class_ is None:
        rows = [item] if text else [str(image)]  # a list of Items, or of paths
        class_ = getattr(m, "explained_token", None) or m.classnames[int(m.predict(rows, ctx=ctx)[0])]
    save_heatmap(load_image(str(image)), heat, out, title=f"{m.name}: {class_}")
    console.print(f"{image}: attention of {class_!r} over a {heat.shape[0]}x{heat.shape[1]} grid -> {out}")


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; beyond loopback a --token is required."),
    port: int = typer.Option(8000, help="TCP port."),
    token: str | None = typer.Option(
        None, envvar="VLCLASSIFY_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every route but /healthz."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without a token."),
    max_batch: int = typer.Option(32, min=1, help="Most images in one forward pass (1 = no micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="How long a batch waits for more requests (ms)."),
    queue_size: int = typer.Option(128, min=1, help="Images waiting at most; more are refused with 503."),
    max_bytes: int = typer.Option(20 * 2**20, min=1, help="Largest request body in bytes (413)."),
    max_pixels: int = typer.Option(40_000_000, min=1, help="Largest image, width x height (413, never decoded)."),
    max_images: int = typer.Option(32, min=1, help="Images in one /predict/batch call."),
    timeout: float = typer.Option(30.0, min=0.001, help="Seconds a request may take, upload included (504)."),
    decode_workers: int = typer.Option(2, min=1, help="Threads decoding uploaded images."),
    log_level: str = typer.Option("info", help="uvicorn and service log level."),
    precision: str = typer.Option(
        "fp32", help="fp32, or int8: an exported model's trunk quantised (faster on CPU, see docs/benchmarks.md)."
    ),
) -> None:
    """Serve a fitted model over HTTP: /predict, /predict/batch, /explain, a web page at /, /metrics."""
    from .serve import BatchConfig, ServeConfig
    from .serve import serve as run_server

    config = ServeConfig(
        token=token or None,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_images=max_images,
        timeout=timeout,
        decode_workers=decode_workers,
        batching=BatchConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size),
        precision=precision,
    )
    run_server(str(model_dir), host=host, port=port, config=config, insecure=insecure, log_level=log_level)


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
        f"classes; checked on {result.checked} image(s), max |difference| {result.max_diff:.2e}",
        markup=False,
        soft_wrap=True,
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
    out: Path = typer.Option(Path("docs/results"), help="Folder for the JSON + markdown table."),
    name: str | None = typer.Option(None, help="File name stem (default: fewshot-<data>)."),
    preset: str | None = PRESET_OPT,
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Few-shot comparison: methods x shots x seeds, mean ± std, fit times."""
    from .bench.fewshot import markdown_table, run_fewshot, write_results
    from .methods.presets import resolve_presets

    specs = parse_method_specs(methods_)
    presets = resolve_presets(preset, _absolute_spec(data))
    _log_presets(presets, data, list(dict.fromkeys(s.method for s in specs)))
    bb = _backbone(backbone, backbone_opt)
    result = run_fewshot(
        bb,
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


@bench_app.command("cma")
def bench_cma(
    data: str = typer.Option("tuxpaint", "--data", "-d", help="Data spec with image, text and task columns."),
    folds: int = typer.Option(5, help="Cross-validation folds."),
    seed: int = typer.Option(0, help="Seed for folds, validation carving and training."),
    tasks: str | None = typer.Option(None, help="Comma-separated task columns (default: all)."),
    variants: str | None = typer.Option(None, help="Comma-separated CMA-CLIP rows (default: all; see bench/cma.py)."),
    opt: list[str] = typer.Option([], "--opt", help="CMA-CLIP option key=value for every variant (repeatable)."),
    fold_limit: int | None = typer.Option(None, help="Run only the first N folds (quick checks)."),
    out: Path = typer.Option(Path("docs/results"), help="Folder for the JSON + markdown table."),
    name: str | None = typer.Option(None, help="File name stem (default: cma-<data>)."),
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """CMA-CLIP benchmark: k-fold CV, per-task accuracy and recall at 90% precision, ablations, noisy modalities."""
    from .bench.cma import markdown_table, run_cma_bench, write_results

    bb = _backbone(backbone, backbone_opt)
    result = run_cma_bench(
        bb,
        data,
        folds=folds,
        seed=seed,
        tasks=tasks.split(",") if tasks else None,
        options=parse_options(opt),
        variants=variants.split(",") if variants else None,
        fold_limit=fold_limit,
        cache=_cache(cache_dir),
        log=_log,
    )
    _report(markdown_table(result), write_results(result, out, name or _stem("cma-", data), command=_command()))


@bench_app.command("dicls")
def bench_dicls(
    data: str = typer.Option(
        "fmnist-mosaic,tuxpaint-composite", "--data", "-d", help="Comma-separated multi-label data specs."
    ),
    seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds."),
    rows: str | None = typer.Option(None, help="Comma-separated row indices (default: all; see bench/dicls.py ROWS)."),
    opt: list[str] = typer.Option([], "--opt", help="DiCLS option key=value applied to every row (JSON values)."),
    jobs: int = typer.Option(2, help="Parallel worker processes (one torch thread each)."),
    out: Path = typer.Option(Path("docs/results"), help="Folder for the JSON + markdown table."),
    name: str = typer.Option("dicls-ablation", help="File name stem."),
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """DiCLS ablation (losses, fusion layers) on cached features: mean ± std over seeds."""
    from .bench.dicls import markdown_table, run_ablation, write_results

    result = run_ablation(
        data.split(","),
        parse_ints(seeds, "seeds"),
        rows=parse_ints(rows, "rows") if rows else None,
        base=parse_options(opt),
        jobs=jobs,
        backbone=backbone,
        backbone_opts=parse_options(backbone_opt),
        cache_dir=str(cache_dir) if cache_dir else None,
        log=_log,
    )
    _report(markdown_table(result), write_results(result, out, name, command=_command()))


@bench_app.command("icar")
def bench_icar(
    data: str = typer.Option(
        "fashion-mnist,tuxpaint", "--data", "-d", help="Comma-separated: fashion-mnist, tuxpaint."
    ),
    seeds: str = typer.Option("1,2,3", help="Comma-separated seeds (each picks its own held-out classes)."),
    shots: str = typer.Option("1,4,16", help="Comma-separated few-shot sizes on the held-out classes."),
    held_out: int = typer.Option(3, help="Classes held out of training entirely, per dataset and seed."),
    fmnist_per_class: int = typer.Option(150, help="Fashion-MNIST training pool: images per class."),
    fmnist_test_per_class: int = typer.Option(100, help="Fashion-MNIST test set: images per class."),
    variants: str | None = typer.Option(
        None, help="Comma-separated row indices (default: all; see bench/icar.py VARIANTS)."
    ),
    opt: list[str] = typer.Option([], "--opt", help="icar option key=value applied to every row (JSON values)."),
    out: Path = typer.Option(Path("docs/results"), help="Folder for the JSON + markdown table."),
    name: str = typer.Option("icar", help="File name stem."),
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """iCAR: held-out-class zero-shot, few-shot and seen-class accuracy with the paper's ablations."""
    from .bench.icar import VARIANTS, markdown_table, run_icar_bench, write_icar_results

    rows = [VARIANTS[i] for i in parse_ints(variants, "variants")] if variants else list(VARIANTS)
    result = run_icar_bench(
        _backbone(backbone, backbone_opt),
        [d.strip() for d in data.split(",")],
        parse_ints(seeds, "seeds"),
        parse_ints(shots, "shots"),
        rows,
        cache=_cache(cache_dir),
        fmnist_per_class=fmnist_per_class,
        fmnist_test_per_class=fmnist_test_per_class,
        n_held=held_out,
        options=parse_options(opt),
        log=_log,
    )
    result["command"] = _command()
    _report(markdown_table(result), write_icar_results(result, out, name))


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
    console.print(f"cache: {info['root']}", markup=False, soft_wrap=True)
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
        f"ONNX trunk exports {_bytes(info['onnx_bytes'])}",
        markup=False,
        soft_wrap=True,
    )
    if verify:
        console.print(f"verified: {len(info['damaged'])} damaged shard(s) dropped", markup=False)


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
        f"{r['leftovers']} leftover(s): {_bytes(r['bytes'])}",
        markup=False,
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
