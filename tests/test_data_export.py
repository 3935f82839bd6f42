"""`vlclassify data export`: the folder it writes loads back as the same data, copies included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from vlclassify.data import Dataset, Item, load_data
from vlclassify.data.export import export_manifest
from vlclassify.errors import DataError


def _img(v: int) -> np.ndarray:
    return np.full((8, 8), v, dtype=np.uint8)


def test_single_label_splits_round_trip(tmp_path):
    names = ["cat", "dog"]
    splits = {
        "train": Dataset([Item(_img(i), label=i % 2, text=f"t{i}") for i in range(6)], names),
        "test": Dataset([Item(_img(100 + i), label=i % 2) for i in range(2)], names),
    }
    csv = export_manifest(splits, tmp_path / "out")
    back = load_data(str(csv))
    assert sorted(back) == ["test", "train"]
    assert back["train"].classnames == names
    assert [it.label for it in back["train"].items] == [0, 1, 0, 1, 0, 1]
    assert [it.text for it in back["train"].items] == [f"t{i}" for i in range(6)]
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(back["test"].items[1].image)), _img(101))


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


def test_multilabel_and_tasks(tmp_path):
    ml = Dataset([Item(_img(i), labels=(0, 2) if i else (1,)) for i in range(3)], ["a", "b", "c"], multilabel=True)
    back = load_data(str(export_manifest({"all": ml}, tmp_path / "ml")))["all"]
    assert back.multilabel and [it.labels for it in back.items] == [(1,), (0, 2), (0, 2)]
    tasks = {"color": ["red", "blue"], "style": ["plain", "dotted"]}
    mt = Dataset(
        [Item(_img(i), label=i % 2, tasks={"color": i % 2, "style": (i // 2) % 2}) for i in range(4)],
        tasks["color"],
        tasks=tasks,
    )
    back = load_data(str(export_manifest({"all": mt}, tmp_path / "mt")))["all"]
    assert set(back.tasks) == {"color", "style"}
    assert [(back.tasks["style"][it.tasks["style"]]) for it in back.items] == ["plain", "plain", "dotted", "dotted"]


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(DataError, match="not an empty folder"):
        export_manifest({"all": Dataset([Item(_img(0), label=0)], ["a"])}, tmp_path / "x")
