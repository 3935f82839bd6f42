"""Which images to label: each `vlclassify suggest` strategy against uniform random, with a simulated labeller.

The labeller answers with the true label. Rounds run as the labelling page runs them: each round
labels `--round` images (default: one per class), then the model is refreshed (a linear probe on
the labels so far: logistic regression on L2-normalised pooled features at C = 10, the linear
probe's C without a validation set) and the next round is chosen with its scores. Budgets are 1, 2,
4, 8 labels per class on average; the score at a budget is the test accuracy of the probe fitted on
the labels chosen by then. Pools and test sets are disjoint: Fashion-MNIST's first `--pool` training
images (seeded draw) against `--test` of its test images; Tux Paint halved, stratified. Strategies
needing a model (margin, entropy) label their first round at random; `auto@T` switches from
typical to margin at T labels per class (`vlclassify.suggest.AUTO_SWITCH` is the T chosen here).

    python benchmarks/studies/active_learning.py [--seeds 1,2,3] [--pool 2000] [--test 2000] [--out docs/results]

Each pool writes docs/results/active-learning-<pool>.json as it goes (`--datasets fashion-mnist`
and `--datasets tuxpaint` can run side by side); the report (active-learning.json/.md/.png) is
built from those files at the end, or alone with `--report-only`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from vlclassify import create_backbone, extract_features, load_data
from vlclassify.data import stratified_split
from vlclassify.features import FeatureCache
from vlclassify.suggest import AUTO_SWITCH, auto_strategy, choose
from vlclassify.training.logistic import fit_logistic
from vlclassify.utils import atomic_path, read_json, write_json

BUDGETS = (1, 2, 4, 8)  # labels per class on average
PROBE_C = 10.0  # the linear probe's C when it has no validation set (middle of its grid)
SWITCHES = tuple(t for t in (1.0, 2.0, 4.0) if t != AUTO_SWITCH)  # auto@T: the other switch points measured


def features(bb, ds, cache) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, F] L2-normalised pooled features, y [N])."""
    f = extract_features(bb, ds, cache=cache)
    return torch.nn.functional.normalize(f.pooled.float(), dim=-1).numpy(), ds.labels()


def probe(x: np.ndarray, y: np.ndarray, num_classes: int):
    """The linear probe on the labelled rows x [n, F] -> a function giving softmax scores [N, C].

    Solved in the span of the labelled features (an orthonormal basis Q [F, n]): an L2-penalised W
    lies in that span (the representer theorem), so fitting x Q and mapping back, W = W' Q^T, is the
    probe's minimiser, found without the solver's F x F preconditioner (n << F here)."""
    q, _ = np.linalg.qr(x.T.astype(np.float64))  # [F, n]
    q = q.astype(np.float32)
    w, b = fit_logistic(x @ q, y, PROBE_C, num_classes=num_classes)
    w = w @ torch.from_numpy(q.T)  # [C, F]

    def scores(z: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(z) @ w.T + b, -1).numpy()

    return scores


def simulate(strategy: str, pool, test, num_classes: int, round_size: int, seed: int) -> dict[int, float]:
    """Budget (labels per class) -> test accuracy of the probe on the labels `strategy` chose."""
    (xp, yp), (xt, yt) = pool, test
    labelled = np.zeros(len(xp), dtype=bool)
    out: dict[int, float] = {}
    rnd = 0
    for budget in BUDGETS:
        while labelled.sum() < budget * num_classes:
            n = min(round_size, budget * num_classes - int(labelled.sum()))
            have = len(set(yp[labelled].tolist())) >= 2  # a probe needs two classes
            s = strategy
            if strategy.startswith("auto@"):
                s = "typical" if not have or labelled.sum() < float(strategy[5:]) * num_classes else "margin"
            elif strategy == "auto":
                s = auto_strategy(int(labelled.sum()), num_classes, have)
            if s in ("margin", "entropy") and not have:
                s = "random"  # the cold start of a model-only strategy
            scores = probe(xp[labelled], yp[labelled], num_classes)(xp) if s in ("margin", "entropy") else None
            picks = choose(xp, labelled, n, s, scores, seed=seed * 1000 + rnd)
            labelled[picks] = True
            rnd += 1
        acc = (probe(xp[labelled], yp[labelled], num_classes)(xt).argmax(1) == yt).mean()
        out[budget] = float(acc)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items()):
        today = "auto" if r["auto_switch"] == AUTO_SWITCH else f"auto@{AUTO_SWITCH:g}"  # the rule auto uses now
        for s, by_budget in r["accuracy"].items():
            if s.startswith("auto") and s != today:
                continue
            m = [100 * np.mean(by_budget[str(b)]) for b in BUDGETS]
            label = f"auto (T = {AUTO_SWITCH:g})" if s == today else s
            ax.plot(
                [b * r["classes"] for b in BUDGETS],
                m,
                marker="o",
                label=label,
                lw=2.5 if s in (today, "random") else 1.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labels")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: pool {r['pool']}, test {r['test']}, seeds {len(r['seeds'])}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table(results: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for name, r in results.items():
        lines += [f"### {name} (pool {r['pool']}, test {r['test']}, {r['classes']} classes, seeds {r['seeds']})", ""]
        lines.append("| strategy | " + " | ".join(f"{b}/class ({b * r['classes']})" for b in BUDGETS) + " |")
        lines.append("|---|" + "---|" * len(BUDGETS))
        rand = {b: np.mean(r["accuracy"]["random"][str(b)]) for b in BUDGETS}
        for s, by_budget in r["accuracy"].items():
            cells = []
            for b in BUDGETS:
                v = np.array(by_budget[str(b)])
                d = "" if s == "random" else f" ({100 * (v.mean() - rand[b]):+.1f})"
                cells.append(f"{100 * v.mean():.1f} ± {100 * v.std():.1f}{d}")
            name_ = f"auto (T = {r['auto_switch']:g})" if s == "auto" else s
            if s == f"auto@{AUTO_SWITCH:g}" or (s == "auto" and r["auto_switch"] == AUTO_SWITCH):
                name_ += " = today's auto"
            lines.append(f"| {name_} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_dataset(name: str, args, seeds: list[int], out: Path) -> None:
    """All strategies on one pool; active-learning-<name>.json is rewritten after each strategy, so
    a run cut short keeps what it measured (`complete` says whether it finished)."""
    bb, cache = create_backbone("effnet-minilm"), FeatureCache()
    data = load_data(name)
    if name == "fashion-mnist":
        rng = np.random.default_rng(0)
        pool_ds = data["train"].subset(np.sort(rng.choice(len(data["train"]), args.pool, replace=False)))
        test_ds = data["test"].subset(np.sort(rng.choice(len(data["test"]), args.test, replace=False)))
    else:
        halves = stratified_split(next(iter(data.values())), {"pool": 0.5, "test": 0.5}, seed=0)
        pool_ds, test_ds = halves["pool"], halves["test"]
    t0 = time.time()
    pool, test = features(bb, pool_ds, cache), features(bb, test_ds, cache)
    c = pool_ds.num_classes
    strategies = ["random", "typical", "coreset", "margin", "entropy", "auto", *(f"auto@{t:g}" for t in SWITCHES)]
    acc: dict = {}
    for k, s in enumerate(strategies):
        acc[s] = {str(b): [] for b in BUDGETS}
        for seed in seeds:
            for b, a in simulate(s, pool, test, c, c, seed).items():
                acc[s][str(b)].append(a)
        print(name, s, {b: round(100 * float(np.mean(v)), 1) for b, v in acc[s].items()}, f"{time.time() - t0:.0f} s")
        result = {"pool": len(pool_ds), "test": len(test_ds), "classes": c, "seeds": seeds, "auto_switch": AUTO_SWITCH}
        result["accuracy"] = acc
        write_json(
            out / f"active-learning-{name}.json",
            {**result, "seconds": round(time.time() - t0, 1), "complete": k == len(strategies) - 1},
        )


def report(args, out: Path) -> None:
    """The combined JSON, plot and markdown table from the per-pool files in `out`."""
    results = {}
    for name in args.datasets.split(","):
        path = out / f"active-learning-{name}.json"
        if path.exists():
            results[name] = read_json(path)
    command = "python benchmarks/studies/active_learning.py " + " ".join(
        f"--{k} {v}" for k, v in (("seeds", args.seeds), ("pool", args.pool), ("test", args.test))
    )
    seconds = {n: r["seconds"] for n, r in results.items()}
    rep = {
        "command": command,
        "auto_switch_now": AUTO_SWITCH,
        "probe_C": PROBE_C,
        "seconds": seconds,
        "results": results,
    }
    write_json(out / "active-learning.json", rep)
    plot(results, out / "active-learning.png")
    wall = ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    with atomic_path(out / "active-learning.md") as tmp:
        tmp.write_text(
            table(results, command) + f"\nWall time per pool (one process each, run side by side): {wall}.\n"
        )
    print(table(results, command))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--pool", type=int, default=2000, help="Fashion-MNIST pool size")
    ap.add_argument("--test", type=int, default=2000, help="Fashion-MNIST test size")
    ap.add_argument("--datasets", default="fashion-mnist,tuxpaint")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--report-only", action="store_true", help="Only rebuild the report from the per-pool files")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        for name in args.datasets.split(","):
            run_dataset(name, args, [int(s) for s in args.seeds.split(",")], out)
    report(args, out)


if __name__ == "__main__":
    main()
