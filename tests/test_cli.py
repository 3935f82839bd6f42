import json
import subprocess
import sys

from typer.testing import CliRunner

from vlclassify.cli import app

runner = CliRunner()


def test_fit_eval_predict_on_a_folder(color_folder, tmp_path):
    out = tmp_path / "model"
    r = runner.invoke(
        app,
        [
            "fit",
            "-m",
            "linear-probe",
            "-d",
            str(color_folder),
            "-o",
            str(out),
            "--backbone",
            "toy",
            "--test-fraction",
            "0.34",
            "--val-fraction",
            "0.33",
        ],
    )
    assert r.exit_code == 0, r.output
    info = json.loads((out / "fit.json").read_text())
    assert info["sizes"]["train"] >= 3 and 0 <= info["validation"]["accuracy"] <= 1
    assert info["decisions"]["label"] == "the top class"
    r = runner.invoke(app, ["eval", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "eval-test.json").read_text())
    assert rep["top1"] == 1.0 and len(rep["confusion_matrix"]) == 3
    img = next((color_folder / "green").iterdir())
    r = runner.invoke(app, ["predict", str(out), str(img), str(img), "--top", "2", "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.strip().splitlines()]  # JSON lines: one object per image
    assert len(lines) == 2 and lines[0]["labels"] == ["green"] and lines[0]["scores"][0]["label"] == "green"
    assert len(lines[0]["scores"]) == 2 and not lines[0]["uncertain"]
    r = runner.invoke(app, ["predict", str(out), str(img)])
    assert r.exit_code == 0 and r.output.startswith(f"{img}: green (")


def test_fewshot_bench_writes_table(color_folder, tmp_path):
    r = runner.invoke(
        app,
        [
            "bench",
            "fewshot",
            "-d",
            str(color_folder),
            "--methods",
            "zero-shot,linear-probe[C_grid=[1.0]]",
            "--shots",
            "1,2",
            "--seeds",
            "1,2",
            "--backbone",
            "toy",
            "--out",
            str(tmp_path),
            "--name",
            "t",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "t.json").read_text())
    assert len(res["runs"]) == 2 * 2 * 2 and "command" in res
    md = (tmp_path / "t.md").read_text()
    assert "| linear-probe[C_grid=[1.0]] |" in md and "±" in md


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("image,label\nnope.png,a\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlclassify.cli",
            "fit",
            "-m",
            "zero-shot",
            "-d",
            str(bad),
            "-o",
            str(tmp_path / "o"),
            "--backbone",
            "toy",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "m.csv:2: image file not found" in r.stderr and "Traceback" not in r.stderr


def test_eval_on_an_empty_split_is_a_clear_error(color_folder, tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(
        app, ["fit", "-m", "linear-probe", "-d", str(color_folder), "-o", str(out), "--backbone", "toy", "--shots", "5"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(out)])  # 6 images per class: 5 train + 1 val leave no test image
    from vlclassify.errors import DataError

    assert isinstance(r.exception, DataError) and "split is empty" in str(r.exception)
