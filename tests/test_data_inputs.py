"""Issue 10's bad-input table, data-layer rows: each row read through `load_data(spec)` from files in tmp_path."""

import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from vlclassify.data import Item, load_data, load_image, train_val_test
from vlclassify.data.classes import parse_classes
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
    from vlclassify.data.hashing import content_hash

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
            h = content_hash(it)
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
    row = np.asarray(load_image(str(p)))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.abs(row - np.arange(256)).max() <= 1
    assert (row == 255).mean() < 0.01  # was 99.6% white


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_pil_mode_loads_as_rgb(mode):
    im = Image.new(mode, (5, 3))
    out = __import__("vlclassify.data.images", fromlist=["to_rgb"]).to_rgb(im)
    assert out.mode == "RGB" and out.size == (5, 3)


def test_float_and_32bit_images_and_an_unknown_mode():
    from vlclassify.data.images import to_rgb

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
        load_image(ds.items[2])
    folder_item = Item(image=str(bad), origin=str(bad))
    with pytest.raises(DataError, match=r"^\S*x.jpg: cannot read image") as e:
        load_image(folder_item)
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
