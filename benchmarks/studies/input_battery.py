"""A battery of bad inputs, odd files and faults through the CLI, as a new user would meet them.

Each case runs `python -m vlclassify ...` in a fresh folder on the toy backbone (seconds each) and is
judged by what a user needs: a run that should work works; one that cannot gives one clear line on
stderr, no traceback, and leaves the user's files as they were. Prints a table and writes JSON.

    python benchmarks/studies/input_battery.py --out docs/results/input-battery
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@dataclass
class Case:
    """One input: the command, what should happen, and any extra check on the files afterwards."""

    area: str  # fit | eval | predict | update | extract | serve | export | cache
    name: str
    argv: list[str]  # after `vlclassify`; {root} is the case's folder
    expect: str  # "ok" (exit 0) or "error" (one clear line, no traceback)
    setup: Callable[[Path], None] = lambda root: None
    check: Callable[[Path, subprocess.CompletedProcess], str] = lambda root, p: ""  # "" = fine, else why not
    env: dict[str, str] = field(default_factory=dict)
    stdin_json: bool = False  # stdout must be JSON lines only


def colors(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """One sub-folder per colour of noisy solid-colour PNGs (trivially separable)."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{name}_{i}.png")
    return root


def fitted(root: Path, method: str = "linear-probe") -> None:
    """A data folder and a model fitted on it, made once per case that needs one."""
    colors(root / "data")
    run(
        ["fit", "--method", method, "--data", str(root / "data"), "--out", str(root / "model"), "--backbone", "toy"],
        root,
    )


def run(argv: list[str], root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, in `root`, with the case's environment."""
    e = {**os.environ, "VLCLASSIFY_CACHE": str(root / "cache"), "COLUMNS": "80", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vlclassify", *argv], cwd=root, env=e, capture_output=True, text=True, timeout=300
    )


def files_of(folder: Path) -> list[str]:
    """Every file under `folder`, relative: to see that nothing of the user's was removed."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def keeps(sub: str) -> Callable[[Path, subprocess.CompletedProcess], str]:
    """A check: the folder `sub` still holds the 18 images it had."""

    def check(root: Path, p: subprocess.CompletedProcess) -> str:
        n = len([f for f in files_of(root / sub) if f.endswith(".png")])
        return "" if n == 18 else f"{sub} holds {n} of 18 images afterwards"

    return check


def judge(case: Case, root: Path, p: subprocess.CompletedProcess) -> tuple[bool, str]:
    """(as a user needs it, why not)."""
    both = p.stdout + p.stderr
    if "Traceback" in both:
        return False, "traceback"
    if case.expect == "ok" and p.returncode != 0:
        return False, f"exit {p.returncode}: {last_line(p.stderr)}"
    if case.expect == "error":
        if p.returncode == 0:
            return False, "exit 0 where it should refuse"
        if not last_line(p.stderr):
            return False, "no message on stderr"
    if case.stdin_json:
        for line in p.stdout.splitlines():
            try:
                json.loads(line)
            except ValueError:
                return False, f"stdout not JSON: {line[:60]!r}"
    why = case.check(root, p)
    return (not why), why


def last_line(text: str) -> str:
    """The last non-empty line (where the one-line error is)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def cases() -> list[Case]:
    """The battery."""
    fit = ["fit", "--method", "linear-probe", "--backbone", "toy"]

    def corrupt(name: str, data: bytes) -> Callable[[Path], None]:
        def setup(root: Path) -> None:
            colors(root / "data")
            (root / "data" / "red" / name).write_bytes(data)

        return setup

    def truncated_jpeg(root: Path) -> None:
        colors(root / "data")
        Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "t.jpg", quality=90)
        (root / "data" / "red" / "cut.jpg").write_bytes((root / "t.jpg").read_bytes()[:200])
        (root / "t.jpg").unlink()

    def odd_modes(root: Path) -> None:
        colors(root / "data")
        Image.new("CMYK", (30, 30), (0, 200, 200, 0)).save(root / "data" / "red" / "cmyk.jpg")
        Image.new("LA", (30, 30), (90, 128)).save(root / "data" / "green" / "la.png")
        Image.fromarray((np.arange(900).reshape(30, 30) * 70).astype(np.uint16)).save(
            root / "data" / "blue" / "g16.png"
        )
        frames = [Image.new("P", (20, 20), i) for i in range(3)]
        frames[0].save(root / "data" / "blue" / "anim.gif", save_all=True, append_images=frames[1:])

    def unicode_names(root: Path) -> None:
        colors(root / "data")
        for p in list((root / "data" / "red").glob("*.png"))[:3]:
            p.rename(p.with_name(f"фото 🍓 {p.stem}.png"))

    def csv_with(text: str) -> Callable[[Path], None]:
        def setup(root: Path) -> None:
            colors(root / "data")
            (root / "m.csv").write_text(text.format(root=root))

        return setup

    def damaged(file: str, how: str) -> Callable[[Path], None]:
        def setup(root: Path) -> None:
            fitted(root)
            p = root / "model" / file
            p.write_bytes(p.read_bytes()[:100] if how == "cut" else b"{not json")

        return setup

    def readonly_cache(root: Path) -> None:
        fitted(root)
        (root / "ro").mkdir()
        os.chmod(root / "ro", stat.S_IRUSR | stat.S_IXUSR)

    def read_only_data(root: Path) -> None:
        colors(root / "data")
        for p in (root / "data").rglob("*"):
            os.chmod(p, (stat.S_IRUSR | stat.S_IXUSR) if p.is_dir() else stat.S_IRUSR)

    return [
        Case(
            "fit",
            "empty data folder",
            [*fit, "--data", "{root}/empty", "--out", "{root}/m"],
            "error",
            lambda r: (r / "empty").mkdir(),
        ),
        Case("fit", "data folder does not exist", [*fit, "--data", "{root}/nowhere", "--out", "{root}/m"], "error"),
        Case(
            "fit",
            "one class only",
            [*fit, "--data", "{root}/data/red", "--out", "{root}/m"],
            "error",
            lambda r: colors(r / "data"),
        ),
        Case(
            "fit",
            "zero-byte PNG",
            [*fit, "--data", "{root}/data", "--out", "{root}/m"],
            "error",
            corrupt("empty.png", b""),
        ),
        Case(
            "fit",
            "zero-byte PNG with --skip-bad",
            [*fit, "--data", "{root}/data", "--out", "{root}/m", "--skip-bad"],
            "ok",
            corrupt("empty.png", b""),
        ),
        Case(
            "fit",
            "text file named .png",
            [*fit, "--data", "{root}/data", "--out", "{root}/m"],
            "error",
            corrupt("notes.png", b"shopping list\n"),
        ),
        Case("fit", "truncated JPEG", [*fit, "--data", "{root}/data", "--out", "{root}/m"], "error", truncated_jpeg),
        Case(
            "fit",
            "CMYK JPEG, LA PNG, 16-bit PNG, animated GIF",
            [*fit, "--data", "{root}/data", "--out", "{root}/m"],
            "ok",
            odd_modes,
        ),
        Case(
            "fit",
            "unicode and spaces in file names",
            [*fit, "--data", "{root}/data", "--out", "{root}/m"],
            "ok",
            unicode_names,
        ),
        Case(
            "fit",
            "unknown method",
            ["fit", "--method", "nope", "--data", "{root}/data", "--out", "{root}/m"],
            "error",
            lambda r: colors(r / "data"),
        ),
        Case(
            "fit",
            "option of the wrong type",
            [*fit, "--data", "{root}/data", "--out", "{root}/m", "--opt", "max_iter=abc"],
            "error",
            lambda r: colors(r / "data"),
        ),
        Case(
            "fit",
            "unknown option",
            [*fit, "--data", "{root}/data", "--out", "{root}/m", "--opt", "nope=1"],
            "error",
            lambda r: colors(r / "data"),
        ),
        Case(
            "fit",
            "--shots 0",
            [*fit, "--data", "{root}/data", "--out", "{root}/m", "--shots", "0"],
            "error",
            lambda r: colors(r / "data"),
        ),
        Case(
            "fit",
            "--out is an existing file",
            [*fit, "--data", "{root}/data", "--out", "{root}/file.txt"],
            "error",
            lambda r: (colors(r / "data"), (r / "file.txt").write_text("mine")),
        ),
        Case(
            "fit",
            "--out the data folder --overwrite",
            [*fit, "--data", "{root}/data", "--out", "{root}/data", "--overwrite"],
            "error",
            lambda r: colors(r / "data"),
            keeps("data"),
        ),
        Case(
            "fit",
            "--out a parent of the data --overwrite",
            [*fit, "--data", "{root}/data", "--out", "{root}", "--overwrite"],
            "error",
            lambda r: colors(r / "data"),
            keeps("data"),
        ),
        Case(
            "fit",
            "--out . --overwrite",
            [*fit, "--data", "{root}/data", "--out", ".", "--overwrite"],
            "error",
            lambda r: colors(r / "data"),
            keeps("data"),
        ),
        Case(
            "fit", "read-only data folder", [*fit, "--data", "{root}/data", "--out", "{root}/m"], "ok", read_only_data
        ),
        Case(
            "fit",
            "CSV row naming a missing image",
            [*fit, "--data", "{root}/m.csv", "--out", "{root}/m"],
            "error",
            csv_with("image,label\n{root}/data/red/red_0.png,red\n{root}/nope.png,red\n"),
        ),
        Case(
            "fit",
            "CSV without an image column",
            [*fit, "--data", "{root}/m.csv", "--out", "{root}/m"],
            "error",
            csv_with("path,label\n{root}/data/red/red_0.png,red\n"),
        ),
        Case(
            "fit",
            "CSV in Latin-1",
            [*fit, "--data", "{root}/m.csv", "--out", "{root}/m"],
            "error",
            lambda r: (
                colors(r / "data"),
                (r / "m.csv").write_bytes(f"image,label\n{r}/data/red/red_0.png,caf\xe9\n".encode("latin-1")),
            ),
        ),
        Case("eval", "not a model folder", ["eval", "{root}/data"], "error", lambda r: colors(r / "data")),
        Case(
            "eval",
            "truncated model.safetensors",
            ["eval", "{root}/model"],
            "error",
            damaged("model.safetensors", "cut"),
        ),
        Case("eval", "config.json not JSON", ["eval", "{root}/model"], "error", damaged("config.json", "json")),
        Case(
            "eval",
            "data with a class the model lacks",
            ["eval", "{root}/model", "--data", "{root}/other"],
            "error",
            lambda r: (fitted(r), colors(r / "other"), (r / "other" / "red").rename(r / "other" / "purple")),
        ),
        Case("predict", "file does not exist", ["predict", "{root}/model", "{root}/nope.png"], "error", fitted),
        Case("predict", "a folder of images", ["predict", "{root}/model", "{root}/data/red"], "ok", fitted),
        Case(
            "predict",
            "a corrupt image",
            ["predict", "{root}/model", "{root}/bad.png"],
            "error",
            lambda r: (fitted(r), (r / "bad.png").write_bytes(b"\x89PNG broken")),
        ),
        Case(
            "predict",
            "--json writes JSON lines only",
            ["predict", "{root}/model", "{root}/data/red", "--json"],
            "ok",
            fitted,
            stdin_json=True,
        ),
        Case(
            "predict",
            "read-only cache folder",
            ["predict", "{root}/model", "{root}/data/red/red_0.png"],
            "ok",
            readonly_cache,
            env={"VLCLASSIFY_CACHE": "{root}/ro"},
        ),
        Case(
            "predict",
            "unwritable HOME, no VLCLASSIFY_CACHE",
            ["predict", "{root}/model", "{root}/data/red/red_0.png"],
            "ok",
            readonly_cache,
            env={"HOME": "{root}/ro", "VLCLASSIFY_CACHE": "", "XDG_CACHE_HOME": ""},
        ),
        Case(
            "update",
            "zero-shot: a new class by name",
            ["update", "{root}/model", "--classes", "purple", "--out", "{root}/m2"],
            "ok",
            lambda r: fitted(r, "zero-shot"),
        ),
        Case(
            "update",
            "a case variant of a model class",
            ["update", "{root}/model", "--classes", "Red", "--out", "{root}/m2"],
            "error",
            lambda r: fitted(r, "zero-shot"),
        ),
        Case(
            "extract",
            "data spec with an unknown option",
            ["extract", "--data", "{root}/data?bogus=1", "--backbone", "toy"],
            "error",
            lambda r: colors(r / "data"),
        ),
        Case(
            "extract",
            "twice: the second run reads the store",
            ["extract", "--data", "{root}/data", "--backbone", "toy"],
            "ok",
            lambda r: (colors(r / "data"), run(["extract", "--data", str(r / "data"), "--backbone", "toy"], r)),
        ),
        Case(
            "export",
            "a method without an ONNX graph",
            ["export", "{root}/model"],
            "error",
            lambda r: fitted(r, "dicls"),
        ),
        Case(
            "export",
            "--out in a folder that does not exist",
            ["export", "{root}/model", "--out", "{root}/no/such/dir/m.onnx"],
            "ok",
            fitted,
        ),
        Case("serve", "public bind without a token", ["serve", "{root}/model", "--host", "0.0.0.0"], "error", fitted),
        Case("serve", "not a model folder", ["serve", "{root}/data"], "error", lambda r: colors(r / "data")),
        Case(
            "cache",
            "info on a cache that does not exist yet",
            ["cache", "info"],
            "ok",
            env={"VLCLASSIFY_CACHE": "{root}/fresh"},
        ),
        Case("cache", "prune with a bad size", ["cache", "prune", "--max-size", "lots"], "error"),
    ]


def main() -> None:
    """Run the battery; print the table; write JSON + markdown under --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/input-battery"))
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    args = ap.parse_args()
    rows = []
    for case in cases():
        if args.k and args.k not in case.name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            case.setup(root)
            argv = [a.replace("{root}", str(root)) for a in case.argv]
            env = {k: v.replace("{root}", str(root)) for k, v in case.env.items()}
            t0 = time.perf_counter()
            p = run(argv, root, env)
            ok, why = judge(case, root, p)
            for d in root.rglob("*"):  # read-only cases: let the temp folder go
                if d.is_dir():
                    os.chmod(d, stat.S_IRWXU)
            rows.append(
                {
                    "area": case.area,
                    "case": case.name,
                    "expect": case.expect,
                    "exit": p.returncode,
                    "ok": ok,
                    "why": why,
                    "message": last_line(p.stderr) if p.returncode else "",
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
        r = rows[-1]
        print(
            f"{'ok ' if r['ok'] else 'BAD'} {r['area']:8s} {r['case'][:48]:48s} exit {r['exit']:3d}  "
            f"{(r['why'] or r['message'])[:90]}",
            flush=True,
        )
    good = sum(r["ok"] for r in rows)
    print(f"{good} of {len(rows)} handled as a user needs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"cases": rows, "good": good, "total": len(rows)}, indent=1))
    lines = ["| area | case | expected | exit | handled well | message or why not |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['area']} | {r['case']} | {r['expect']} | {r['exit']} | {'yes' if r['ok'] else '**no**'} | "
        f"{(r['why'] or r['message']).replace('|', '/')} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text(
        f"# Input battery ({good} of {len(rows)} handled well)\n\n`python benchmarks/studies/input_battery.py`\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
