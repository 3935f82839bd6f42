"""Issue 10's bad-input table, data-layer rows: each row read through `load_data(spec)` from files in tmp_path."""

import io
import json
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from vlclassify.data import Item, decode, load_data, train_val_test
from vlclassify.data.classes import parse_classes
from vlclassify.data.source import BytesSource
from vlclassify.errors import DataError


@pytest.fixture
def imgs(tmp_path):
    """12 distinct small PNGs (random noise, so no two share content)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        p = tmp_path / "img" / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def write(path, text: str, bom: bool = False):
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def names(ds, item):
    return [ds.classnames[i] for i in item.labels]


# ---- multi-label values -------------------------------------------------------------------------
def test_labels_split_on_comma_semicolon_bar_or_whitespace(tmp_path, imgs):
    rows = ["animal, mammal", "animal;bird|flying", "ankle boot, sandal", "ankle boot", "scab rust", "bird,,", ",cat;"]
    p = write(tmp_path / "m.csv", "image,labels\n" + "".join(f'{imgs[i]},"{v}"\n' for i, v in enumerate(rows)))
    ds = load_data(str(p))["all"]
    got = [names(ds, it) for it in ds.items]
    assert got == [
        ["animal", "mammal"],
        ["animal", "bird", "flying"],
        ["ankle boot", "sandal"],
        ["ankle boot"],  # whole value is a class name seen in a separated list: kept whole
        ["rust", "scab"],  # no , ; | -> whitespace
        ["bird"],  # doubled / trailing separators never make an empty class
        ["cat"],
    ]
    assert "" not in ds.classnames and "animal," not in ds.classnames


def test_labels_sep_forces_one_separator(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f'image,labels\n{imgs[0]},"red, dark;blue"\n{imgs[1]},"green;"\n')
    ds = load_data(f"{p}?labels_sep=;")["all"]
    assert [names(ds, it) for it in ds.items] == [["blue", "red, dark"], ["green"]]
    ds = load_data(f"{p}?labels_sep=space")["all"]
    assert [names(ds, it) for it in ds.items] == [["dark;blue", "red,"], ["green;"]]
    q = write(tmp_path / "s.csv", f"image,label\n{imgs[0]},a\n")
    with pytest.raises(DataError, match="labels_sep=';' needs a 'labels' column"):
        load_data(f"{q}?labels_sep=;")


def test_jsonl_label_lists_are_taken_as_they_are(tmp_path, imgs):
    rows = [{"image": str(imgs[0]), "labels": ["ankle boot", "a, b", " "]}, {"image": str(imgs[1]), "labels": []}]
    p = write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"m.jsonl:2: empty 'labels' value"):
        load_data(str(p))
    ds = load_data(f"{p}?allow_empty_labels=true")["all"]
    assert [names(ds, it) for it in ds.items] == [["a, b", "ankle boot"], []]


# ---- BOM, column counts ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_utf8_bom_is_stripped(tmp_path, imgs, suffix):
    text = f"image,label\n{imgs[0]},a\n{imgs[1]},b\n" if suffix == ".csv" else json.dumps({"image": str(imgs[0])})
    if suffix == ".jsonl":
        text = "\n".join(json.dumps({"image": str(imgs[i]), "label": c}) for i, c in ((0, "a"), (1, "b")))
    ds = load_data(str(write(tmp_path / f"m{suffix}", text, bom=True)))["all"]
    assert ds.classnames == ["a", "b"] and len(ds) == 2


def test_more_values_than_header_columns_names_the_first_such_row(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image\n{imgs[0]}\n{imgs[1]},flags\n{imgs[2]},x\n")
    with pytest.raises(DataError, match=r"m.csv:3: 2 values but the header has 1 column\(s\) \(image\)"):
        load_data(str(p))


def test_fewer_values_than_columns_is_an_empty_label(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,label\n{imgs[0]},a\n{imgs[1]}\n")
    with pytest.raises(DataError, match=r"m.csv:3: empty 'label' value"):
        load_data(str(p))
    ds = load_data(f"{p}?allow_empty_labels=true")["all"]
    assert ds.classnames == ["a"] and ds.items[1].label is None


# ---- empty labels --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["csv-single", "csv-multi", "jsonl-single", "jsonl-multi"])
def test_empty_label_is_an_error_naming_the_row_unless_allowed(tmp_path, imgs, kind):
    fmt, card = kind.split("-")
    col = "labels" if card == "multi" else "label"
    vals = ["a", "", "b"]
    if fmt == "csv":
        p = write(tmp_path / "m.csv", f"image,{col}\n" + "".join(f"{imgs[i]},{v}\n" for i, v in enumerate(vals)))
    else:
        empty = {"single": None, "multi": []}[card]
        rows = [
            {"image": str(imgs[i]), col: (v or empty) if card == "single" else ([v] if v else [])}
            for i, v in enumerate(vals)
        ]
        p = write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows))
    line = 3 if fmt == "csv" else 2  # the CSV's line 1 is its header
    with pytest.raises(DataError, match=rf"m.{fmt}:{line}: empty '{col}' value"):
        load_data(str(p))
    ds = load_data(f"{p}?allow_empty_labels=true")["all"]
    assert ds.classnames == ["a", "b"]  # never a class named 'None' or ''
    if card == "multi":
        assert ds.items[1].labels == () and ds.multi_hot()[1].sum() == 0
    else:
        assert ds.items[1].label is None and ds.labels().tolist() == [0, -1, 1]


def test_flags_must_be_true_or_false(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,label\n{imgs[0]},a\n")
    with pytest.raises(DataError, match="allow_empty_labels='maybe' must be true or false"):
        load_data(f"{p}?allow_empty_labels=maybe")


# ---- duplicates ----------------------------------------------------------------------------------
def copy_of(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


def test_duplicates_found_by_content_before_splitting(tmp_path, imgs):
    """4 rows are copies (2 by path, 2 by content): one warning with the count and the first pair;
    after train_val_test no image (by content hash) is in two splits."""
    dup = copy_of(imgs[1], tmp_path / "img" / "copy.png")
    rows = [(imgs[i], "ab"[i % 2]) for i in range(12)] + [(imgs[0], "a"), (imgs[0], "a"), (dup, "b"), (imgs[3], "b")]
    p = write(tmp_path / "m.csv", "image,label\n" + "".join(f"{i},{c}\n" for i, c in rows))
    with pytest.warns(UserWarning, match=r"4 duplicate image\(s\) dropped") as rec:
        raw = load_data(str(p))
    msgs = [str(w.message) for w in rec if "duplicate" in str(w.message)]
    assert len(msgs) == 1 and re.search(r"m.csv:2 and \S*m.csv:14\)", msgs[0])
    assert len(raw["all"]) == 12
    splits = train_val_test(raw, seed=0, val_fraction=0.25, test_fraction=0.25)
    seen = {}
    for s, ds in splits.items():
        for it in ds.items:
            h = it.image.hash()
            assert seen.setdefault(h, s) == s, f"{it.image} in {seen[h]} and {s}"


def test_duplicates_in_different_splits_keep_the_test_copy(tmp_path, imgs):
    rows = [(imgs[0], "train"), (imgs[0], "val"), (imgs[0], "test"), (imgs[1], "train"), (imgs[1], "val")]
    rows += [(imgs[2], "train"), (imgs[3], "test"), (imgs[4], "val")]
    p = write(tmp_path / "m.csv", "image,label,split\n" + "".join(f"{i},a,{s}\n" for i, s in rows))
    with pytest.warns(UserWarning, match=r"3 duplicate image\(s\) dropped.*2 had copies in different splits"):
        s = load_data(str(p))
    assert [it.origin.split(":")[-1] for it in s["test"].items] == ["4", "8"]
    assert [it.origin.split(":")[-1] for it in s["val"].items] == ["6", "9"]
    assert [it.origin.split(":")[-1] for it in s["train"].items] == ["7"]


def test_duplicates_with_conflicting_labels(tmp_path, imgs):
    dup = copy_of(imgs[0], tmp_path / "img" / "copy.png")
    p = write(tmp_path / "m.csv", f"image,label\n{imgs[0]},rust\n{imgs[1]},rust\n{dup},scab\n")
    with pytest.raises(
        DataError, match=r"m.csv:2 and .*m.csv:4: the same image with different labels 'rust' and 'scab'"
    ):
        load_data(str(p))
    # multi-label: the copies' labels are merged (rows that list an image's labels piecemeal)
    p = write(tmp_path / "m.csv", f"image,labels\n{imgs[0]},rust\n{imgs[1]},rust\n{dup},scab\n")
    with pytest.warns(UserWarning, match="labels of the copies were merged for 1 image"):
        ds = load_data(str(p))["all"]
    assert len(ds) == 2 and names(ds, ds.items[0]) == ["rust", "scab"]


def test_duplicates_in_an_image_folder(tmp_path, imgs):
    root = tmp_path / "folder"
    for c, idx in (("cat", (0, 1, 2)), ("dog", (3, 4, 5))):
        (root / c).mkdir(parents=True)
        for i in idx:
            copy_of(imgs[i], root / c / f"{i}.png")
    copy_of(imgs[1], root / "cat" / "again.png")
    with pytest.warns(UserWarning, match=r"1 duplicate image\(s\) dropped"):
        assert len(load_data(str(root))["all"]) == 6
    copy_of(imgs[0], root / "dog" / "wrong.png")
    with pytest.raises(DataError, match=r"cat/0.png and .*dog/wrong.png: the same image with different labels"):
        load_data(str(root))


def test_same_image_with_different_texts_is_not_a_duplicate(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,label,text\n{imgs[0]},a,red shirt\n{imgs[0]},a,blue shirt\n{imgs[1]},b,x\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_data(str(p))["all"]) == 3


# ---- images --------------------------------------------------------------------------------------
def test_16bit_png_gradient_scales_to_8_bits(tmp_path):
    grad = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))  # [4, 256]
    p = tmp_path / "g16.png"
    Image.fromarray(grad).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    row = np.asarray(decode(str(p)))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.abs(row - np.arange(256)).max() <= 1
    assert (row == 255).mean() < 0.01  # was 99.6% white


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_pil_mode_loads_as_rgb(mode):
    im = Image.new(mode, (5, 3))
    out = __import__("vlclassify.data.decoder", fromlist=["to_rgb"]).to_rgb(im)
    assert out.mode == "RGB" and out.size == (5, 3)


def test_float_and_32bit_images_and_an_unknown_mode():
    from vlclassify.data.decoder import to_rgb

    f = Image.fromarray(np.linspace(0, 1, 11, dtype=np.float32)[None])
    assert np.abs(np.asarray(to_rgb(f))[0, :, 0] - 25.5 * np.arange(11)).max() <= 0.5
    big = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))  # outside 0..65535: min-max
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [0, 128, 255]
    la = Image.new("LA", (2, 1), (0, 0))  # transparent black on white
    assert np.asarray(to_rgb(la)).min() == 255
    im = Image.new("L", (2, 2))
    im._mode = "XYZ"  # a mode PIL may add one day
    with pytest.raises(DataError, match="image mode 'XYZ' is not supported"):
        to_rgb(im)


def test_corrupt_image_error_names_the_manifest_row(tmp_path, imgs):
    bad = tmp_path / "img" / "x.jpg"
    bad.write_bytes(b"not a jpeg")
    p = write(tmp_path / "labels.csv", f"image,label\n{imgs[0]},a\n{imgs[1]},b\nimg/x.jpg,a\n")
    ds = load_data(str(p))["all"]
    assert ds.items[2].origin.endswith("labels.csv:4")
    with pytest.raises(DataError, match=r"^\S*labels.csv:4: \S*img/x.jpg: cannot read image \("):
        decode(ds.items[2])
    folder_item = Item(image=str(bad), origin=str(bad))
    with pytest.raises(DataError, match=r"^\S*x.jpg: cannot read image") as e:
        decode(folder_item)
    assert not str(e.value).startswith(f"{bad}: {bad}")  # the origin is not repeated when it is the file


def test_origin_is_not_part_of_the_fingerprint_or_key(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,label\n{imgs[0]},a\n{imgs[1]},b\n")
    ds = load_data(str(p))["all"]
    from dataclasses import replace

    moved = replace(ds, items=[replace(it, origin="elsewhere:1") for it in ds.items])
    assert moved.fingerprint() == ds.fingerprint()
    assert [it.key for it in ds.items] == [f"{it.key}" for it in moved.items]
    assert "|" in ds.items[0].key and str(imgs[0]) in ds.items[0].key  # path | size | mtime | line, as before


# ---- options: bad values are one line naming the option ----------------------------------------
def test_bad_option_values_are_one_line_errors(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,label\n{imgs[0]},a\n{imgs[1]},b\n")
    with pytest.raises(DataError, match=r"composite option n_train='abc': expected an integer"):
        load_data("fmnist-mosaic?n_train=abc")
    with pytest.raises(DataError, match=r"composite option seed='1.5': expected an integer"):
        load_data("tuxpaint-composite?seed=1.5")
    with pytest.raises(DataError, match=r"unknown option 'n_trian' \(options: n_train, "):
        load_data("fmnist-mosaic?n_trian=3")
    with pytest.raises(DataError, match=r"unknown option 'lables_sep' \(options: tasks, classes"):
        load_data(f"{p}?lables_sep=;")
    with pytest.raises(DataError, match=r"option 'tasks' is given twice"):
        load_data(f"{p}?tasks=a&tasks=b")
    with pytest.raises(DataError, match=r"option 'tasks=a,,b' has an empty name"):
        load_data(f"{p}?tasks=a,,b")
    with pytest.raises(DataError, match=r"class 'a' is listed twice"):
        load_data(f"{p}?classes=a,b,a")
    raw = load_data(str(p))
    with pytest.raises(DataError, match=r"val_fraction='x': expected a number"):
        train_val_test(raw, val_fraction="x")
    with pytest.raises(DataError, match=r"test_fraction=1.5: must be at least 0 and below 1"):
        train_val_test(raw, test_fraction=1.5)
    with pytest.raises(DataError, match=r"leave no training data"):
        train_val_test(raw, val_fraction=0.5, test_fraction=0.5)


def test_single_label_api_on_multilabel_data_is_a_data_error(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,labels\n{imgs[0]},a b\n{imgs[1]},b\n")
    ds = load_data(str(p))["all"]
    with pytest.raises(DataError, match="multi-label data .* this needs single-label data"):
        ds.labels()
    with pytest.raises(DataError, match="no task 'color'"):
        ds.task_labels("color")


def test_classes_option_takes_a_class_file(tmp_path, imgs):
    cf = write(tmp_path / "classes.txt", "# plant diseases\nhealthy\nrust: orange pustules\n\nscab\n")
    p = write(tmp_path / "m.csv", f"image,label\n{imgs[0]},rust\n{imgs[1]},scab\n")
    assert load_data(f"{p}?classes={cf}")["all"].classnames == ["healthy", "rust", "scab"]
    write(tmp_path / "m.csv", f"image,label\n{imgs[0]},rust\n{imgs[1]},mildew\n")
    with pytest.raises(DataError, match=r"m.csv:3: label 'mildew' is not in the class list"):
        load_data(f"{p}?classes={cf}")


def test_other_header_mistakes(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image;label\n{imgs[0]};a\n")
    with pytest.raises(DataError, match=r"needs an 'image' column \(found: image;label\); the file seems to use ';'"):
        load_data(str(p))
    write(p, f"image,label,labels\n{imgs[0]},a,a\n")
    with pytest.raises(DataError, match="both a 'label' and a 'labels' column"):
        load_data(str(p))
    write(p, f"image,label,label\n{imgs[0]},a,b\n")
    with pytest.raises(DataError, match=r"m.csv:1: column 'label' appears twice"):
        load_data(str(p))
    write(p, f"image, label,\n{imgs[0]}, a,\n{imgs[1]},b,\n")  # spaces after commas, a trailing comma (Excel)
    assert load_data(str(p))["all"].classnames == ["a", "b"]
    p.write_bytes(f"image,label\n{imgs[0]},caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m.csv: not UTF-8 text .* save it as UTF-8"):
        load_data(str(p))


# ---- class lists (--classes) ----------------------------------------------------------------------
def test_parse_classes_list_and_file(tmp_path):
    assert parse_classes("cat, dog ,bird") == (["cat", "dog", "bird"], {})
    f = write(tmp_path / "classes.txt", "# day one\ncat: a small feline\n\n  dog  \nbird: has wings: and a beak\n")
    assert parse_classes(str(f)) == (["cat", "dog", "bird"], {"cat": "a small feline", "bird": "has wings: and a beak"})
    assert parse_classes(str(write(tmp_path / "bom.txt", "a\nb\n", bom=True)))[0] == ["a", "b"]


def test_parse_classes_errors_name_the_line(tmp_path):
    with pytest.raises(DataError, match=r"class 2 has an empty name"):
        parse_classes("cat,,dog")
    with pytest.raises(DataError, match=r"class 'cat' is listed twice \(positions 1 and 3\)"):
        parse_classes("cat,dog,cat")
    with pytest.raises(DataError, match=r"classes 'clases.txt': no such file"):
        parse_classes("clases.txt")
    f = write(tmp_path / "c.txt", "cat\n: no name\n")
    with pytest.raises(DataError, match=r"c.txt:2: empty class name"):
        parse_classes(str(f))
    write(f, "cat\n# x\ndog\ncat: again\n")
    with pytest.raises(DataError, match=r"c.txt:4: class 'cat' is already listed on line 1"):
        parse_classes(str(f))
    write(f, "# only comments\n\n")
    with pytest.raises(DataError, match=r"c.txt: no classes"):
        parse_classes(str(f))


def test_a_multi_word_label_alone_is_kept_whole_when_the_class_list_names_it(tmp_path, imgs):
    p = write(tmp_path / "m.csv", f"image,labels\n{imgs[0]},ankle boot\n{imgs[1]},sandal bag\n")
    ds = load_data(f"{p}?classes=ankle boot,sandal,bag")["all"]
    assert [names(ds, it) for it in ds.items] == [["ankle boot"], ["sandal", "bag"]]
    with pytest.raises(DataError, match=r"m.csv:2: label 'ankle' is not in the class list"):
        load_data(f"{p}?classes=ankle boot,sandal,bag&labels_sep=space")


# ---- labels that differ only in case or surrounding space ------------------------------------------
def test_case_variant_labels_are_one_error_naming_the_pair(tmp_path, imgs):
    rows = ["Food", "food", "Food", "drink", "drink", "food"]
    csv = write(tmp_path / "m.csv", "image,label\n" + "".join(f"{p},{y}\n" for p, y in zip(imgs, rows)))
    with pytest.raises(DataError, match=r"labels 'Food' and 'food' differ only in case"):
        load_data(str(csv))
    multi = write(tmp_path / "ml.csv", "image,labels\n" + f'{imgs[0]},"a, B"\n{imgs[1]},b\n')
    with pytest.raises(DataError, match=r"'B' and 'b'|'b' and 'B'"):
        load_data(str(multi))


def test_case_variant_class_folders_are_one_error(tmp_path, imgs):
    for i, name in enumerate(["Smile", "smile", "frown"]):
        (tmp_path / "root" / name).mkdir(parents=True)
        for p in imgs[i * 4 : i * 4 + 4]:
            (tmp_path / "root" / name / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="differ only in case"):
        load_data(str(tmp_path / "root"))


def test_update_with_a_case_variant_of_a_model_class_is_refused(toy, tmp_path, imgs):
    from vlclassify.methods import create_method

    ds = load_data(
        str(
            write(
                tmp_path / "a.csv",
                "image,label\n" + "".join(f"{p},{'smile' if i % 2 else 'frown'}\n" for i, p in enumerate(imgs[:6])),
            )
        )
    )["all"]
    m = create_method("zero-shot", toy).fit(ds)
    new = load_data(str(write(tmp_path / "b.csv", "image,label\n" + "".join(f"{p},Smile\n" for p in imgs[6:8]))))["all"]
    with pytest.raises(DataError, match=r"'smile' and 'Smile' differ only in case"):
        m.update(new)
    with pytest.raises(DataError, match=r"'smile' and 'Smile' differ only in case"):
        m.update(classes=["Smile"])  # by name alone, as `vlclassify update --classes` does
    assert m.classnames == ["frown", "smile"]


def test_multilabel_shots_give_every_label_k_images(tmp_path):
    """Grouping multi-label items by their first label left labels that only come second with no
    training image ("no training images for class(es) bird, fruit"): now each label gets K."""
    from vlclassify.data import Dataset, fewshot

    rng = np.random.default_rng(0)
    items = []
    for i in range(60):  # label 0 first everywhere; labels 1-3 only ever come second or third
        extra = sorted(rng.choice([1, 2, 3], size=int(rng.integers(1, 3)), replace=False).tolist())
        items.append(Item(image=f"{i}.png", labels=(0, *extra), key=f"k{i}"))
    ds = Dataset(items, ["animal", "bird", "fruit", "tree"], name="m", multilabel=True)
    train, val = fewshot(ds, shots=4, seed=1)
    assert (train.multi_hot().sum(0) >= 4).all()
    assert (val.multi_hot().sum(0) >= 4).all()
    assert not {it.key for it in train.items} & {it.key for it in val.items}
    again, _ = fewshot(ds, shots=4, seed=1)
    assert [it.key for it in again.items] == [it.key for it in train.items]
    other, _ = fewshot(ds, shots=4, seed=2)
    assert [it.key for it in other.items] != [it.key for it in train.items]


# ---- issue 20: folders and files a user's photo collection has ---------------------------------
def folder_of(tmp_path, per_class=3, size=(10, 8)):
    """classes a, b with `per_class` distinct PNGs each."""
    rng = np.random.default_rng(1)
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "d" / c / f"{i}.png")
    return tmp_path / "d"


def read_folder(root):
    """(items of the 'all' split, the one warning about what was not read or None)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = load_data(str(root))["all"]
    said = [str(w.message) for w in rec if "not read" in str(w.message)]
    assert len(said) <= 1, said  # said once, whatever the count
    return ds, (said[0] if said else None)


def test_symlinks_dangling_looping_outside_and_folder_loops(tmp_path):
    root = folder_of(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.full((8, 10, 3), 7, np.uint8)).save(outside / "far.png")
    (root / "a" / "gone.png").symlink_to(tmp_path / "no-such.png")  # dangling (was a traceback in file_key)
    (root / "a" / "self.png").symlink_to(root / "a" / "self.png")  # a link to itself
    (root / "b" / "far.png").symlink_to(outside / "far.png")  # a link out of the data: read
    (root / "b" / "up").symlink_to(root / "b")  # a folder link back to its parent: read once
    (root / "b" / "more").symlink_to(outside)  # a folder link out of the data: read
    ds, said = read_folder(root)
    names = sorted(os.path.relpath(it.image.describe(), root) for it in ds.items)
    assert names == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png", "b/far.png"]
    # b/more/far.png is the same content as b/far.png: dropped as a duplicate, not lost silently
    assert said is not None and "2 dangling or looping link(s) (e.g. a/gone.png)" in said
    assert "1 folder link loop(s) or second link(s) to one folder (e.g. b/up)" in said


def test_hidden_files_and_folders_are_not_data_at_any_depth(tmp_path):
    root = folder_of(tmp_path)
    (root / ".thumbnails" / "x").mkdir(parents=True)  # was a class
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / ".thumbnails" / "x" / "t.png")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork: was read as a PNG
    (root / "b" / "sub" / ".cache").mkdir(parents=True)
    Image.fromarray(np.ones((4, 4, 3), np.uint8)).save(root / "b" / "sub" / ".cache" / "c.png")
    ds, said = read_folder(root)
    assert ds.classnames == ["a", "b"] and len(ds) == 6
    assert said is not None and "4 hidden (e.g. .thumbnails)" in said


def test_every_format_pillow_reads_is_read_and_the_rest_counted(tmp_path, monkeypatch):
    from vlclassify.data import decoder as decode_module
    from vlclassify.data import loaders

    root = folder_of(tmp_path)
    arr = np.random.default_rng(2).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / "a" / "photo.jfif", format="JPEG")  # was skipped without a word
    Image.fromarray(arr[::-1]).save(root / "a" / "photo.tga")
    Image.fromarray(arr[:, ::-1]).save(root / "b" / "phone.heic")  # through pillow-heif (the heic extra)
    (root / "b" / "notes.txt").write_text("not an image")
    ds, said = read_folder(root)
    got = {os.path.basename(it.image.describe()) for it in ds.items}
    assert {"photo.jfif", "photo.tga", "phone.heic"} <= got and len(ds) == 9
    heic = next(it for it in ds.items if it.image.describe().endswith(".heic"))
    assert decode(heic).size == (10, 8)
    assert said is not None and "1 not image(s) (e.g. b/notes.txt)" in said
    # without pillow-heif: a named refusal, counted when a folder is read, an error when decoded
    monkeypatch.setattr(loaders, "HEIF", False)
    monkeypatch.setattr(decode_module, "HEIF", False)
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])  # as if the plugin were not there
    ds, said = read_folder(root)
    assert len(ds) == 8 and "1 HEIC/HEIF (HEIC/HEIF images need the optional pillow-heif package" in said
    with pytest.raises(DataError, match=r"phone.heic: HEIC/HEIF images need the optional pillow-heif package"):
        decode(heic)


def test_a_class_with_one_image_is_said_to_have_no_validation_image(tmp_path):
    root = folder_of(tmp_path, per_class=6)
    (root / "c").mkdir()
    Image.fromarray(np.full((8, 10, 3), 99, np.uint8)).save(root / "c" / "only.png")
    with pytest.warns(UserWarning, match=r"too small to split train/val/test: c \(1 image: no val, test\)"):
        s = train_val_test(load_data(str(root)), seed=0)
    assert [s["val"].classnames[it.label] for it in s["val"].items].count("c") == 0


# ---- the one decoder ------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height RGB pixels, all zero (zlib makes it a few hundred bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (the phone was held upright, the sensor stored the picture sideways): decoded
    as a viewer shows it, for a file, bytes and an item alike."""
    upright = np.random.default_rng(3).integers(0, 256, (12, 20, 3), dtype=np.uint8)  # [H, W, 3] landscape
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 12 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.png", exif=exif)
    got = decode(str(tmp_path / "phone.png"))
    assert got.size == (20, 12) and np.array_equal(np.asarray(got), upright)
    assert np.array_equal(np.asarray(decode(BytesSource((tmp_path / "phone.png").read_bytes(), "up"))), upright)


def test_limits_are_refused_from_the_header_in_one_line(tmp_path):
    from vlclassify.data.decoder import MAX_ASPECT, TooLarge

    strip = tmp_path / "strip.png"
    strip.write_bytes(png_header_only(30000, 4))  # 120k pixels; once cost 1.9 GB in the resize
    with pytest.raises(
        TooLarge, match=rf"strip.png: 30000 x 4: aspect ratio 7500:1, over the limit of {MAX_ASPECT:g}:1$"
    ):
        decode(str(strip), size=224)
    with pytest.raises(TooLarge, match=r"^upload: 3000 x 2000 = 6000000 pixels, over the limit of 5000000$"):
        decode(BytesSource(png_header_only(3000, 2000), "upload"), max_pixels=5_000_000)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jpg: empty image \(0 bytes\)$"):
        decode(str(empty))


def test_large_images_are_reduced_towards_the_model_input_small_ones_untouched(tmp_path):
    from vlclassify.pixels import unit_array as pil_to_unit_array

    rng = np.random.default_rng(4)
    big = Image.fromarray(rng.integers(0, 256, (1900, 2000, 3), dtype=np.uint8))
    big.save(tmp_path / "big.png")
    big.save(tmp_path / "big.jpg", quality=90)
    small = decode(str(tmp_path / "big.png"), size=224)
    assert small.size == (1000, 950)  # short side 1900 >= 8 x 224: reduced by 2 (a 6300^2 PNG: by 7, to 900^2)
    assert decode(np.asarray(small), size=224).size == small.size  # reducing twice changes nothing
    assert decode(str(tmp_path / "big.jpg"), size=224).size == (1000, 950)  # JPEG: libjpeg's 1/2 draft
    assert decode(str(tmp_path / "big.png"), size=None).size == (2000, 1900)
    below = decode(str(tmp_path / "big.png"), size=238)  # 1900 < 8 x 238: not reduced, bit for bit
    assert below.tobytes() == big.tobytes()
    a, b = pil_to_unit_array(small, 224), pil_to_unit_array(big, 224)
    assert np.abs(a - b).mean() < 0.01  # noise is the worst case for a box filter; photos: see decode_reduction.py
