"""Issue 10's table, row by row, through the command line: every bad input ends as one line."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlclassify.cli import app
from vlclassify.data import Dataset, Item, load_data
from vlclassify.data.export import export_manifest
from vlclassify.errors import DataError

runner = CliRunner()
TOY = ["--backbone", "toy"]


def run(*args, ok=True):
    r = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def one_line_error(r, *needles):
    assert r.exit_code != 0
    msg = str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else r.output
    assert "Traceback" not in r.output and "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.fixture
def lp_model(color_folder, tmp_path):
    out = tmp_path / "lp"
    run(
        "fit",
        "-m",
        "linear-probe",
        "-d",
        color_folder,
        "-o",
        out,
        *TOY,
        "--val-fraction",
        "0.34",
        "--test-fraction",
        "0.33",
    )
    return out


def test_out_folder_rules(color_folder, lp_model, tmp_path):
    (lp_model / "eval-test.json").write_text("{}")  # an old run's output
    r = run("fit", "-m", "zero-shot", "-d", color_folder, "-o", lp_model, *TOY, ok=False)
    one_line_error(r, "not empty", "--overwrite")
    run("fit", "-m", "zero-shot", "-d", color_folder, "-o", lp_model, *TOY, "--overwrite")
    assert sorted(p.name for p in lp_model.iterdir()) == ["config.json", "fit.json", "model.safetensors", "split.json"]
    assert json.loads((lp_model / "config.json").read_text())["method"] == "zero-shot"
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(run("fit", "-m", "zero-shot", "-d", color_folder, "-o", f, *TOY, ok=False), "is a file")


def test_damaged_model_folders_are_named(lp_model, color_folder, tmp_path):
    w = lp_model / "model.safetensors"
    raw = bytearray(w.read_bytes())
    rng = np.random.default_rng(0)
    pos = rng.integers(200, len(raw) - 100)
    raw[pos : pos + 100] = rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
    w.write_bytes(bytes(raw))
    img = next((color_folder / "red").iterdir())
    one_line_error(run("predict", lp_model, img, ok=False), "model.safetensors", "damaged")
    w.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    one_line_error(run("predict", lp_model, img, ok=False), "damaged")
    cfg_path = lp_model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "method": "nonsense"}))
    one_line_error(run("predict", lp_model, img, ok=False), "config.json", "unknown method 'nonsense'")
    one_line_error(run("eval", tmp_path / "nope", ok=False), "no such model folder")


def test_a_class_removed_from_config_is_named(lp_model, color_folder):
    cfg_path = lp_model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["classnames"] = cfg["classnames"][:2]
    cfg["tasks"]["label"] = cfg["classnames"]
    cfg_path.write_text(json.dumps(cfg))
    img = next((color_folder / "red").iterdir())
    one_line_error(run("predict", lp_model, img, ok=False), "config.json")


def test_eval_from_another_directory_and_on_a_file_of_test_images(lp_model, color_folder, tmp_path):
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        run("eval", lp_model)
    finally:
        os.chdir(here)
    rows = [{"image": str(p), "label": p.parent.name} for p in sorted(color_folder.rglob("*.png"))]
    test_csv = tmp_path / "test.csv"
    with open(test_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label"])
        w.writeheader()
        w.writerows(rows)
    run("eval", lp_model, "--data", test_csv)
    rep = json.loads((lp_model / "eval-test.json").read_text())
    assert rep["n"] == len(rows)  # every row of a file without a split column
    table = list(csv.DictReader(open(lp_model / "predictions-test.csv")))
    assert len(table) == len(rows) and {"item", "decision", "scores", "truth"} <= set(table[0])


def test_bench_shots_that_are_not_numbers(color_folder):
    one_line_error(run("bench", "fewshot", "-d", color_folder, "--shots", "1,a", *TOY, ok=False), "'a'", "--shots")


def test_shots_larger_than_every_class_warn_at_fit(color_folder, tmp_path):
    r = run("fit", "-m", "linear-probe", "-d", color_folder, "-o", tmp_path / "m", "--shots", "50", *TOY)
    assert "no images are left for" in r.output


def test_corrupt_image_during_fit_is_named_and_skippable(tmp_path):
    rows = []
    for c, rgb in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        for i in range(5):
            p = tmp_path / f"{c}{i}.png"
            Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).save(p)
            rows.append({"image": p.name, "label": c})
    (tmp_path / "red3.png").write_bytes(b"not a png at all")
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label"])
        w.writeheader()
        w.writerows(rows)
    r = run("fit", "-m", "linear-probe", "-d", man, "-o", tmp_path / "m1", *TOY, ok=False)
    one_line_error(r, "m.csv:5", "red3.png", "cannot read image")
    r = run("fit", "-m", "linear-probe", "-d", man, "-o", tmp_path / "m2", *TOY, "--skip-bad")
    assert (tmp_path / "m2" / "model.safetensors").is_file()


def test_multilabel_csv_with_linear_probe_fits_evals_and_predicts_decisions(tmp_path):
    from test_contract import write_manifest

    man = write_manifest(tmp_path / "ml", "multi")
    out = tmp_path / "lp"
    r = run("fit", "-m", "linear-probe", "-d", man, "-o", out, *TOY)
    assert "decision (label): every label scoring >= its threshold" in r.output
    run("eval", out)
    rep = json.loads((out / "eval-test.json").read_text())
    assert isinstance(rep["threshold"], list) and len(rep["threshold"]) == 3 and 0 <= rep["micro_f1"] <= 1
    img = next((tmp_path / "ml").glob("red_*.png"))
    line = json.loads(run("predict", out, img, "--json").output.strip())
    assert set(line["labels"]) <= {"red", "green", "blue"} and len(line["scores"]) == 3
    run("predict", out, "--data", man, "--csv", tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    with open(man) as f:
        want = {row["image"]: sorted(row["labels"].split(",")) for row in csv.DictReader(f)}
    assert {os.path.basename(r["item"]): sorted(r["truth"].split(";")) for r in rows} == want  # truth beside decisions


def test_zero_shot_from_class_names_alone(tmp_path, color_folder):
    classes = tmp_path / "classes.txt"
    classes.write_text("red: the colour of blood\ngreen\nblue: the colour of the sky\n")
    out = tmp_path / "zs"
    run("fit", "-m", "zero-shot", "--classes", classes, "-o", out, *TOY)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["classnames"] == ["red", "green", "blue"] and cfg["descriptions"]["red"] == "the colour of blood"
    img = next((color_folder / "red").iterdir())
    r = run("predict", out, img, "--csv", tmp_path / "p.csv")
    assert r.output.startswith(str(img)) and (tmp_path / "p.csv").is_file()
    one_line_error(
        run("fit", "-m", "linear-probe", "--classes", "a,b", "-o", tmp_path / "x", *TOY, ok=False), "learns from images"
    )


def _colour_csv(root, colours, per_class=6):
    from vlclassify.testing import write_image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in colours:
        for i in range(per_class):
            p = root / f"{c}{i}.png"
            write_image(p, c, seed=i)
            rows.append({"image": p.name, "label": c})
    path = root / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_update_adds_classes_and_examples_without_refitting(tmp_path):
    old = _colour_csv(tmp_path / "old", ["red", "green"])
    new = _colour_csv(tmp_path / "new", ["blue", "red"])
    run("fit", "-m", "tip-adapter", "-d", old, "-o", tmp_path / "tip", *TOY)
    r = run("update", tmp_path / "tip", "-d", new, "-o", tmp_path / "tip2")
    assert "key(s) added to the cache" in r.output and "classes added: blue" in r.output
    cfg = json.loads((tmp_path / "tip2" / "config.json").read_text())
    assert cfg["classnames"] == ["green", "red", "blue"]  # the old classes (sorted by the loader), then the new
    blue = next((tmp_path / "new").glob("blue*.png"))
    assert json.loads(run("predict", tmp_path / "tip2", blue, "--json").output)["labels"] == ["blue"]
    run("fit", "-m", "zero-shot", "--classes", "red,green", "-o", tmp_path / "zs", *TOY)
    (tmp_path / "more.txt").write_text("blue: the colour of the sky\n")
    r = run("update", tmp_path / "zs", "--classes", tmp_path / "more.txt", "-o", tmp_path / "zs2")
    assert "classes added by name" in r.output
    assert json.loads((tmp_path / "zs2" / "config.json").read_text())["descriptions"] == {
        "blue": "the colour of the sky"
    }
    run("fit", "-m", "cmm", "-d", old, "-o", tmp_path / "cmm", *TOY, "--opt", "steps=5")
    one_line_error(
        run("update", tmp_path / "cmm", "-d", new, "-o", tmp_path / "cmm2", ok=False),
        "cannot add to a fitted model",
        "no images of green",
        "tip-adapter",
    )
    every = _colour_csv(tmp_path / "every", ["red", "green", "blue"])
    assert "refit from scratch" in run("update", tmp_path / "cmm", "-d", every, "-o", tmp_path / "cmm3").output
    run("fit", "-m", "linear-probe", "-d", old, "-o", tmp_path / "lp", *TOY)
    r = run("update", tmp_path / "lp", "-d", every, "-o", tmp_path / "lp2")
    assert "warm start from the fitted weights" in r.output and "classes added: blue" in r.output
    assert json.loads(run("predict", tmp_path / "lp2", blue, "--json").output)["labels"] == ["blue"]


@pytest.mark.parametrize("kind", ["single", "multi", "text", "tasks"])
def test_data_export_writes_a_manifest_that_reads_back_the_same(kind, tmp_path):
    from test_contract import write_manifest
    from vlclassify.data import load_data

    src = load_data(str(write_manifest(tmp_path / "src", kind)))
    run("data", "export", tmp_path / "src" / "data.csv", tmp_path / "out")
    back = load_data(str(tmp_path / "out" / "labels.csv"))
    assert set(back) == set(src)
    for split in src:
        a, b = src[split], back[split]
        assert a.classnames == b.classnames and a.tasks == b.tasks and a.multilabel == b.multilabel
        assert [(x.label, x.labels, x.text, x.tasks) for x in a.items] == [
            (x.label, x.labels, x.text, x.tasks) for x in b.items
        ]
    one_line_error(run("data", "export", tmp_path / "src" / "data.csv", tmp_path / "out", ok=False), "not an empty")


def _img(v: int) -> np.ndarray:
    return np.full((8, 8), v, dtype=np.uint8)


def test_copies_with_different_labels_are_written_once(tmp_path):
    """Tux Paint has one stamp in two categories: the export keeps the first, so the CSV it writes
    loads (a user's own CSV with such copies is an error naming both rows)."""
    names = ["military", "people"]
    fireman = "A fireman."
    items = [Item(_img(1), label=0, text=fireman), Item(_img(2), label=1), Item(_img(1), label=1, text=fireman)]
    with pytest.warns(UserWarning, match="1 duplicate image"):
        csv = export_manifest({"all": Dataset(items, names)}, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_data(str(csv))["all"]
    assert [it.label for it in back.items] == [0, 1]
    lines = csv.read_text().splitlines()
    lines.append(lines[1].replace(",military,", ",people,"))  # the same image again, the other label
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="the same image with different labels"):
        load_data(str(csv))


# ---- issue 20: notes on standard error, pipes, predict's inputs, Ctrl-C, the --overwrite guard ----------
def test_warnings_go_to_stderr_and_say_why_a_split_is_empty(tmp_path):
    from conftest import make_color_folder

    folder = make_color_folder(tmp_path / "five", per_class=5)
    r = run("fit", "-m", "linear-probe", "-d", folder, "-o", tmp_path / "m", "--shots", "4", *TOY)
    assert "no images are left for test" in r.stderr and "no images are left" not in r.stdout
    assert "--shots 4 takes 4 training and up to 4 validation images per class, and the largest class has 5" in r.stderr


def test_output_to_a_pipe_never_wraps(tmp_path):
    from conftest import make_color_folder

    folder = make_color_folder(tmp_path / ("a-folder-with-a-rather-long-name-" * 3))
    r = run("fit", "-m", "linear-probe", "-d", folder, "-o", tmp_path / "m", *TOY)
    [line] = [x for x in r.stdout.splitlines() if x.startswith("fit linear-probe on")]
    assert len(line) > 120 and line.endswith(tuple(f"test {n}" for n in range(1, 19)))


def test_predict_json_writes_only_json_lines_to_stdout(lp_model, color_folder, tmp_path):
    img = next((color_folder / "red").iterdir())
    r = run(
        "predict", lp_model, img, img, "--json", "--text", "a red thing", "--text", "x", "--csv", tmp_path / "p.csv"
    )
    assert [json.loads(x)["labels"] for x in r.stdout.splitlines()] == [["red"], ["red"]]
    assert "reads images only" in r.stderr and f"wrote {tmp_path / 'p.csv'}" in r.stderr


def test_predict_a_folder_and_skip_bad_files(lp_model, color_folder, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for p in sorted(color_folder.rglob("*.png"))[::4]:
        (folder / p.name).write_bytes(p.read_bytes())
    n = len(list(folder.iterdir()))
    r = run("predict", lp_model, folder, "--json")
    assert len(r.stdout.splitlines()) == n  # every image of the folder, not "image file not found"
    (folder / "zz-broken.png").write_bytes(b"not a png")
    one_line_error(run("predict", lp_model, folder / "zz-broken.png", ok=False), "zz-broken.png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        r = run("predict", lp_model, *sorted(folder.iterdir()), "--json", "--skip-bad")
    assert len(r.stdout.splitlines()) == n and f"skipped 1 unreadable image(s) of {n + 1}" in r.stderr


def test_ctrl_c_during_fit_says_what_was_kept(color_folder, tmp_path, monkeypatch):
    from vlclassify.methods.linear_probe import LinearProbe

    def interrupted(self, train, val):
        raise KeyboardInterrupt

    monkeypatch.setattr(LinearProbe, "fit_head", interrupted)  # as if Ctrl-C came during training
    out = tmp_path / "m"
    r = run("fit", "-m", "linear-probe", "-d", color_folder, "-o", out, *TOY, ok=False)
    assert r.exit_code == 130 and not out.exists() and not list(tmp_path.glob(".m.*"))
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"interrupted: nothing was saved at {out}; features extracted so far stay in the cache"
    )


def test_overwrite_never_deletes_the_data_or_the_current_directory(color_folder, tmp_path, monkeypatch):
    before = sorted(color_folder.rglob("*"))
    r = run("fit", "-m", "zero-shot", "-d", color_folder, "-o", color_folder, "--overwrite", *TOY, ok=False)
    one_line_error(r, "is the data being read")
    r = run("fit", "-m", "zero-shot", "-d", color_folder, "-o", color_folder.parent, "--overwrite", *TOY, ok=False)
    one_line_error(r, "a folder holding the data being read")
    monkeypatch.chdir(tmp_path)
    one_line_error(
        run("fit", "-m", "zero-shot", "-d", color_folder, "-o", ".", "--overwrite", *TOY, ok=False), "current"
    )
    assert sorted(color_folder.rglob("*")) == before


def test_predict_reads_the_feature_cache_and_writes_it_only_when_asked(color_folder, tmp_path):
    from vlclassify.features import FeatureCache

    cache = tmp_path / "cache"
    run("fit", "-m", "linear-probe", "-d", color_folder, "-o", tmp_path / "m", "--cache-dir", cache, *TOY)

    def rows() -> int:
        return sum(s["rows"] for s in FeatureCache(cache).info()["spaces"])

    before = rows()
    new = tmp_path / "new.png"
    arr = np.full((24, 24, 3), (200, 40, 40), np.uint8)
    arr[0, 0] = (1, 2, 3)  # content no fitted image has
    Image.fromarray(arr).save(new)
    assert "red" in run("predict", tmp_path / "m", new, "--cache-dir", cache).stdout
    assert rows() == before  # read what is there, computed the rest in memory
    run("predict", tmp_path / "m", new, "--cache-dir", cache, "--cache-write")
    assert rows() == before + 1
