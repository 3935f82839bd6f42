"""The `vlclassify` command line: backbones, methods, extract, fit, eval, predict, bench."""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import VLClassifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: few-shot comparison tables.")
app.add_typer(bench_app, name="bench")
cache_app = typer.Typer(no_args_is_help=True, help="The feature cache: what it holds, and trimming it.")
app.add_typer(cache_app, name="cache")
console = Console()

BACKBONE_OPT = typer.Option("effnet-minilm", "--backbone", "-b", help="Backbone name (see `vlclassify backbones`).")
BACKBONE_OPTS = typer.Option([], "--backbone-opt", help="Backbone option key=value (repeatable), e.g. path=./clip.")
CACHE_OPT = typer.Option(
    None, "--cache-dir", help="Feature cache folder (default $VLCLASSIFY_CACHE or ~/.cache/vlclassify)."
)


def _backbone(name: str, opts: list[str]):
    from .backbones import create_backbone
    from .bench.fewshot import parse_options

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


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from .backbones import BACKBONES

    _print_registry(BACKBONES, "backbone")


@app.command()
def methods() -> None:
    """List the registered methods."""
    from .methods import METHODS

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
    precision: str = typer.Option("auto", help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, fp16, bf16."),
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


def _splits_for(data: str, shots: int | None, seed: int, val_fraction: float, test_fraction: float):
    from .data import fewshot, load_data, train_val_test

    raw = load_data(data)
    if shots:
        if "all" in raw:
            pool = raw["all"]
            tr, va = fewshot(pool, shots, seed)
            used = {it.key for it in tr.items + va.items}
            test = pool.subset([i for i, it in enumerate(pool.items) if it.key not in used])
            return {"train": tr, "val": va, "test": test}
        tr, va = fewshot(raw["train"], shots, seed, val_pool=raw.get("val"))
        return {"train": tr, "val": va, **({"test": raw["test"]} if "test" in raw else {})}
    return train_val_test(raw, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)


@app.command()
def fit(
    method: str = typer.Option(..., "--method", "-m", help="Method name (see `vlclassify methods`)."),
    data: str = typer.Option(..., "--data", "-d", help="Data spec (see `vlclassify extract --help`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model."),
    shots: int | None = typer.Option(None, min=1, help="Few-shot: K training images per class (CoOp protocol)."),
    seed: int = typer.Option(1, help="Seed for few-shot sampling and splits."),
    opt: list[str] = typer.Option([], "--opt", help="Method option key=value (repeatable; JSON values)."),
    val_fraction: float = typer.Option(0.2, help="Validation fraction when the data has no val split."),
    test_fraction: float = typer.Option(0.2, help="Test fraction when the data has no splits at all."),
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Train a method and save it (safetensors + JSON) to --out."""
    from .bench.fewshot import parse_options
    from .methods import create_method
    from .metrics import accuracy
    from .utils import write_json

    splits = _splits_for(data, shots, seed, val_fraction, test_fraction)
    bb = _backbone(backbone, backbone_opt)
    m = create_method(method, bb, cache=_cache(cache_dir), **parse_options(opt))
    console.print(f"fit {method} on {data}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    m.fit(splits["train"], splits.get("val"))
    m.save_pretrained(out)
    info = {
        "command": _command(),
        "method": method,
        "data": data,
        "shots": shots,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "sizes": {k: len(v) for k, v in splits.items()},
        "fit_info": m.fit_info,
    }
    if "val" in splits and len(splits["val"]) and not splits["val"].multilabel and not m.multilabel:
        info["val_accuracy"] = accuracy(splits["val"].labels(), m.predict_proba(splits["val"]))
        console.print(f"validation accuracy: {100 * info['val_accuracy']:.2f}%")
    if "val" in splits and len(splits["val"]) and (splits["val"].multilabel or m.multilabel):
        from .metrics import mean_average_precision

        info["val_mAP"] = mean_average_precision(splits["val"].multi_hot(), m.predict_proba(splits["val"]))
        console.print(f"validation mAP: {100 * info['val_mAP']:.2f}%")
    write_json(out / "fit.json", info)
    console.print(f"saved to {out}")


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
    """Evaluate a saved model: top-1, per-class accuracy, macro-F1, confusion matrix (multi-label
    models: subset accuracy, per-label P/R/F1, mAP, ROC-AUC at the validation-chosen threshold)."""
    from .errors import DataError
    from .methods import load_method
    from .metrics import classification_report
    from .utils import read_json, write_json

    info = read_json(model_dir / "fit.json") if (model_dir / "fit.json").exists() else {}
    data = data or info.get("data")
    if not data:
        raise DataError(f"{model_dir}: no fit.json; pass --data")
    splits = _splits_for(
        data, info.get("shots"), info.get("seed", 1), info.get("val_fraction", 0.2), info.get("test_fraction", 0.2)
    )
    if split not in splits:
        raise DataError(f"{data}: no {split!r} split (have: {', '.join(splits)})")
    ds = splits[split]
    if not len(ds):
        raise DataError(f"{data}: the {split!r} split is empty (too few images per class for this split)")
    m = load_method(model_dir, cache=_cache(cache_dir))
    if ds.classnames != m.classnames:
        raise DataError(f"{data}: classes {ds.classnames[:5]}... do not match the model's {m.classnames[:5]}...")
    probs = m.predict_proba(ds)
    if ds.multilabel or m.multilabel:
        from .metrics import multilabel_report

        threshold = m.threshold() if hasattr(m, "threshold") else 0.5
        report = multilabel_report(ds.multi_hot(), probs, m.classnames, threshold)
        keys = (
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
    if hasattr(m, "task_report"):  # multi-task methods (CMA-CLIP): accuracy, recall at 90% precision, λ per task
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
    t = Table("metric", "value")
    for k in keys:
        v = report[k]
        t.add_row(k, f"{100 * v:.2f}%" if isinstance(v, float) else str(v))
    console.print(t)
    console.print(
        f"wrote {report_path} (all metrics, per-class scores, confusion matrix)", markup=False, soft_wrap=True
    )
    if plots:
        from .plots.report import write_eval_plots

        for p in write_eval_plots(
            m, ds, probs, plots_dir or model_dir / f"plots-{split}", title=f"{m.name} on {data} ({split})"
        ):
            console.print(f"wrote {p}")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A folder written by `vlclassify fit`."),
    images: list[Path] = typer.Argument(..., help="Image files."),
    top: int = typer.Option(5, help="How many classes to print per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Print the top classes with probabilities for each image."""
    import numpy as np

    from .methods import load_method

    m = load_method(model_dir, cache=_cache(cache_dir))
    m.progress = False
    probs = m.predict_proba([str(p) for p in images])
    for path, p in zip(images, probs):
        order = np.argsort(-p)[:top]
        if as_json:
            console.print_json(
                json.dumps({"image": str(path), "top": [{"class": m.classnames[i], "p": float(p[i])} for i in order]})
            )
        else:
            console.print(
                f"{path}: " + ", ".join(f"{m.classnames[i]} {100 * p[i]:.1f}%" for i in order),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


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
    from .viz import save_heatmap

    if not image.is_file():
        raise DataError(f"{image}: image file not found")
    m = load_method(model_dir, cache=_cache(cache_dir))
    m.progress = False
    from .data import Item

    target = Item(image=str(image), text=text, key=str(image)) if text else str(image)
    heat = m.explain(target, class_)
    if class_ is None:
        class_ = getattr(m, "explained_token", None) or m.classnames[int(m.predict([target])[0])]
    save_heatmap(load_image(str(image)), heat, out, title=f"{m.name}: {class_}")
    console.print(f"{image}: attention of {class_!r} over a {heat.shape[0]}x{heat.shape[1]} grid -> {out}")


@bench_app.command("fewshot")
def bench_fewshot(
    data: str = typer.Option("fashion-mnist", "--data", "-d", help="Data spec."),
    methods_: str = typer.Option(
        "zero-shot,linear-probe",
        "--methods",
        help="Comma-separated methods; options in brackets: cmm[alpha=1.0;no_triplet=true].",
    ),
    shots: str = typer.Option("1,2,4,8,16", help="Comma-separated shots."),
    seeds: str = typer.Option("1,2,3", help="Comma-separated seeds."),
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
    backbone: str = BACKBONE_OPT,
    backbone_opt: list[str] = BACKBONE_OPTS,
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Few-shot comparison: methods x shots x seeds, mean ± std, fit times."""
    from .bench.fewshot import markdown_table, parse_method_specs, run_fewshot, write_results

    bb = _backbone(backbone, backbone_opt)
    result = run_fewshot(
        bb,
        data,
        parse_method_specs(methods_),
        [int(k) for k in shots.split(",")],
        [int(s) for s in seeds.split(",")],
        test_limit=test_limit,
        cache=_cache(cache_dir),
        log=_log,
        min_per_class=min_per_class,
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
    from .bench.fewshot import parse_options

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
    from .bench.fewshot import parse_options

    result = run_ablation(
        data.split(","),
        [int(s) for s in seeds.split(",")],
        rows=[int(r) for r in rows.split(",")] if rows else None,
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
    from .bench.fewshot import parse_options
    from .bench.icar import VARIANTS, markdown_table, run_icar_bench, write_icar_results

    rows = [VARIANTS[int(i)] for i in variants.split(",")] if variants else list(VARIANTS)
    result = run_icar_bench(
        _backbone(backbone, backbone_opt),
        [d.strip() for d in data.split(",")],
        [int(s) for s in seeds.split(",")],
        [int(k) for k in shots.split(",")],
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


def _parse_amount(text: str, units: dict[str, float], what: str) -> float:
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
    warnings.filterwarnings("default")
    warnings.formatwarning = _one_line_warning  # user-facing warnings, not source lines
    try:
        app(standalone_mode=True)
    except VLClassifyError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)


if __name__ == "__main__":
    main()
