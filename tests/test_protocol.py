"""The few-shot protocol against an independent reference written from its published description
(CoOp / Dassl `generate_fewshot_dataset`, docs: shared README "Few-shot protocol"), the split file
of every fit, and the template ensemble."""

import json
import random
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlclassify.cli import app
from vlclassify.data import (
    Dataset,
    fewshot,
    image_folder,
    load_data,
    plan_splits,
    read_split_file,
    write_split_file,
)
from vlclassify.errors import DataError

runner = CliRunner()
SEEDS = (1, 2, 3)
SHOTS = (1, 2, 4, 8, 16)
# class sizes: some classes shorter than K (1, 2, 3 images), labels interleaved so that the order
# of first appearance (5, 2, 0, 6, ...) is not the index order
TRAIN_SIZES = {0: 20, 1: 3, 2: 17, 3: 1, 4: 9, 5: 16, 6: 2}
VAL_SIZES = {0: 6, 1: 1, 2: 4, 3: 2, 4: 5, 5: 3, 6: 0}


def _interleaved(sizes: dict[int, int], seed: int) -> list[int]:
    labels = [c for c, n in sizes.items() for _ in range(n)]
    np.random.default_rng(seed).shuffle(labels)
    return labels


def reference_fewshot(rows: list, k: int) -> list:
    """The published procedure on a list of (path, label) rows, drawing from the global `random`
    (CoOp calls `random.seed(seed)` first): group by label in order of first appearance; per
    group, `random.sample(group, k)` or the whole group when it is shorter."""
    groups = defaultdict(list)
    for row in rows:
        groups[row[1]].append(row)
    out = []
    for group in groups.values():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


@pytest.fixture
def coop_json(tmp_path):
    """A CoOp split file (train, val, test) with interleaved labels and short classes."""
    names = [f"class_{c}" for c in range(len(TRAIN_SIZES))]
    split = {}
    for s, sizes, seed in (("train", TRAIN_SIZES, 0), ("val", VAL_SIZES, 1), ("test", VAL_SIZES, 2)):
        split[s] = [[f"{names[y]}/{s}_{i:03d}.jpg", y, names[y]] for i, y in enumerate(_interleaved(sizes, seed))]
    p = tmp_path / "split_zhou_Synthetic.json"
    p.write_text(json.dumps(split))
    return p, split


def _paths(ds: Dataset) -> list[str]:
    return [it.key for it in ds.items]  # a CoOp split item's key is its relative path


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", SHOTS)
def test_sampler_equals_the_published_procedure(coop_json, seed, k):
    path, split = coop_json
    state = random.getstate()
    random.seed(seed)
    ref_train = reference_fewshot(split["train"], k)
    ref_val = reference_fewshot(split["val"], min(k, 4))  # the same stream, continued
    random.setstate(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = random.getstate()
        train, val = fewshot(load_data(str(path)), shots=k, seed=seed)
        assert random.getstate() == before  # the global generator is left alone
        planned = plan_splits(str(path), shots=k, seed=seed)
    assert _paths(train) == [r[0] for r in ref_train]  # same items, same order
    assert _paths(val) == [r[0] for r in ref_val]
    assert _paths(planned["train"]) == _paths(train) and _paths(planned["val"]) == _paths(val)
    assert len(planned["test"]) == len(split["test"])
    assert [it.label for it in train.items] == [r[1] for r in ref_train]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", SHOTS)
def test_without_a_val_split_val_continues_the_stream_on_the_images_not_sampled(coop_json, seed, k):
    path, split = coop_json
    state = random.getstate()
    random.seed(seed)
    ref_train = reference_fewshot(split["train"], k)
    rest = [r for r in split["train"] if r not in ref_train]  # in their order
    ref_val = reference_fewshot(rest, min(k, 4))
    random.setstate(state)
    raw = load_data(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = fewshot(raw["train"], shots=k, seed=seed)  # the Dataset form: no val split given
        planned = plan_splits({"train": raw["train"], "test": raw["test"]}, shots=k, seed=seed)
    assert _paths(train) == [r[0] for r in ref_train]
    assert _paths(val) == [r[0] for r in ref_val]
    assert _paths(planned["val"]) == _paths(val)
    assert not set(_paths(train)) & set(_paths(val))


def test_dict_form_takes_the_val_split_and_equals_the_dataset_form(coop_json):
    raw = load_data(str(coop_json[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fewshot(raw, shots=4, seed=2)
        b = fewshot(raw["train"], shots=4, seed=2, val_pool=raw["val"])
        c = fewshot(raw["train"], shots=4, seed=2)
    assert _paths(a[0]) == _paths(b[0]) and _paths(a[1]) == _paths(b[1])
    assert all(p.split("/")[1].startswith("val_") for p in _paths(a[1]))  # from the val split
    assert all(p.split("/")[1].startswith("train_") for p in _paths(c[1]))  # carved from train
    with pytest.raises(DataError, match="inside the dict"):
        fewshot(raw, shots=4, seed=2, val_pool=raw["val"])


def test_short_classes_warn_by_name(coop_json):
    raw = load_data(str(coop_json[0]))
    with pytest.warns(UserWarning, match=r"fewer than 4 images for class 1 \(3\), class 3 \(1\), class 6 \(2\)"):
        fewshot(raw, shots=4, seed=1)


def test_repeat_samples_short_training_classes_with_replacement(coop_json):
    path, split = coop_json
    state = random.getstate()
    random.seed(1)
    groups = defaultdict(list)
    for row in split["train"]:
        groups[row[1]].append(row)
    ref = []
    for g in groups.values():  # Tip-Adapter: random.choices for short classes
        ref.extend(random.sample(g, 8) if len(g) >= 8 else random.choices(g, k=8))
    ref_val = reference_fewshot(split["val"], 4)
    random.setstate(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = fewshot(load_data(str(path)), shots=8, seed=1, repeat=True)
    assert _paths(train) == [r[0] for r in ref] and len(train) == 8 * len(TRAIN_SIZES)
    assert _paths(val) == [r[0] for r in ref_val]


def test_data_without_splits_tests_on_every_image_not_sampled(color_folder):
    raw = image_folder(color_folder)
    p = plan_splits(raw, shots=2, seed=1)
    keys = [set(_paths(p[s])) for s in ("train", "val", "test")]
    assert len(p["train"]) == 6 and len(p["val"]) == 6 and len(p["test"]) == 18 - 12
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert p.test_from == "all"


# ---- split.json ---------------------------------------------------------------------------


def _images_for(split: dict, root):
    """Real (tiny) image files for every row of a split, coloured by class."""
    for rows in split.values():
        for rel, y, _ in rows:
            f = root / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 30 * y, dtype=np.uint8)).save(f, format="PNG")


def test_fit_on_a_coop_split_file_writes_the_described_choice(coop_json, tmp_path):
    path, split = coop_json
    _images_for(split, path.parent)
    out = tmp_path / "model"
    args = ["fit", "-m", "linear-probe", "-d", str(path), "-o", str(out), "--shots", "4", "--seed", "3"]
    r = runner.invoke(app, args + ["--backbone", "toy", "--opt", "C_grid=[1.0]"])
    assert r.exit_code == 0, r.output
    written = json.loads((out / "split.json").read_text())
    state = random.getstate()
    random.seed(3)
    ref_train = reference_fewshot(split["train"], 4)
    ref_val = reference_fewshot(split["val"], 4)
    random.setstate(state)
    clean = lambda rows: [[p, y, c.replace("_", " ")] for p, y, c in rows]  # noqa: E731 (CoOp's prompt names)
    assert written["train"] == clean(ref_train) and written["val"] == clean(ref_val)  # [path, label, classname]
    assert written["test"] == {"source": f"{path}#test"} and written["data"] == str(path)
    # reused: the same items, and the same model
    out2 = tmp_path / "model2"
    r = runner.invoke(
        app,
        ["fit", "-m", "linear-probe", "-d", str(path), "-o", str(out2), "--split-file", str(out / "split.json")]
        + ["--backbone", "toy", "--opt", "C_grid=[1.0]"],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out2 / "split.json").read_text()) == written
    w1 = (out / "model.safetensors").read_bytes()
    assert w1 == (out2 / "model.safetensors").read_bytes()
    r = runner.invoke(app, ["eval", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "eval-test.json").read_text())["n"] == len(split["test"])


def test_split_file_round_trip_on_a_folder_without_splits(color_folder, tmp_path):
    spec = str(color_folder)
    p = plan_splits(spec, shots=2, seed=2)
    f = write_split_file(tmp_path / "split.json", p, spec)
    data = json.loads(f.read_text())
    assert data["train"][0][0].count("/") == 1 and not data["train"][0][0].startswith("/")  # relative to the folder
    assert data["test"] == {"source": f"{spec}#all", "minus": ["train", "val"]}
    back = read_split_file(f, load_data(spec))
    for s in ("train", "val", "test"):
        assert _paths(back[s]) == _paths(p[s])
    assert back.test_from == "all"


def test_split_file_round_trip_of_arrays_and_non_fewshot_splits(tmp_path):
    raw = load_data("fashion-mnist")
    small = {"train": raw["train"].subset(range(300)), "test": raw["test"].subset(range(50))}
    p = plan_splits(small, val_fraction=0.25)  # no shots: val carved from train
    f = write_split_file(tmp_path / "split.json", p, "fashion-mnist")
    rows = json.loads(f.read_text())["train"]
    assert rows[0][0].startswith("fashion-mnist/train/") and rows[0][2] in raw["train"].classnames
    back = read_split_file(f, small)
    assert _paths(back["train"]) == _paths(p["train"]) and _paths(back["val"]) == _paths(p["val"])
    assert len(back["test"]) == 50


def test_split_file_rows_not_in_the_data_are_named(coop_json, tmp_path):
    path, split = coop_json
    raw = load_data(str(path))
    f = tmp_path / "split.json"
    good = {"data": str(path), "train": split["train"][:3], "val": split["val"][:2], "test": None}
    f.write_text(json.dumps({**good, "train": good["train"] + [["nope/x.jpg", 0, "class_0"]]}))
    with pytest.raises(DataError, match=r"train\[3\] 'nope/x.jpg' is not an item"):
        read_split_file(f, raw)
    bad_label = [[split["train"][0][0], (split["train"][0][1] + 1) % 7, "class_x"]]
    f.write_text(json.dumps({**good, "train": bad_label}))
    with pytest.raises(DataError, match=r"train\[0\].*has label"):
        read_split_file(f, raw)
    bad_name = [[split["train"][0][0], split["train"][0][1], "class_x"]]
    f.write_text(json.dumps({**good, "train": bad_name}))
    with pytest.raises(DataError, match=r"class 'class_x'"):
        read_split_file(f, raw)
    f.write_text(json.dumps(good))
    back = read_split_file(f, raw)
    assert _paths(back["train"]) == [r[0] for r in split["train"][:3]] and "test" not in back


# ---- the template ensemble ----------------------------------------------------------------


def test_template_ensemble_is_normalise_average_renormalise(toy, cache):
    from vlclassify.methods.templates import cached_template_embeddings, resolve_templates

    SELECT7 = resolve_templates("select7")

    classes = ["red apple", "blue sky", "green grass"]
    per, ens = cached_template_embeddings(toy, classes, SELECT7, cache)
    with torch.no_grad():
        raw = torch.stack([toy.encode_text([t.format(c) for t in SELECT7]).embeds.float() for c in classes])
    unit = raw / raw.norm(dim=-1, keepdim=True)  # [C, T, D]
    mean = unit.mean(dim=1)
    ref = mean / mean.norm(dim=-1, keepdim=True)
    assert per.shape == unit.shape and (per - unit).abs().max() < 1e-6
    assert (ens - ref).abs().max() < 1e-6
    given = torch.randn(3, ens.shape[1])  # class text embeddings given with the data replace the prompts
    per2, ens2 = cached_template_embeddings(toy, classes, SELECT7, cache, class_text=given)
    assert torch.allclose(ens2, given / given.norm(dim=-1, keepdim=True)) and per2.shape == (3, 1, ens.shape[1])


# ---- Tip-Adapter's protocol (`--preset tip-adapter`) --------------------------------------
# The reference below is written from Tip-Adapter's published description (shared README,
# "Few-shot protocol"): random.seed(1); per label in order of first appearance random.sample(K),
# or random.choices(K) for a short class; keys = the normalised mean of the raw features of the
# augmented views; search on the whole val split, beta in [0.1, s0) with 200 steps outside, alpha
# in [0.1, s1) with 20 steps inside, the first strict improvement wins; logits =
# 100 f·T + alpha exp(-beta (1 - f·K)) one-hot.

TIP_CLASSES = 6
TIP_TRAIN = {0: 9, 1: 2, 2: 7, 3: 1, 4: 8, 5: 5}  # several classes shorter than K


def _tip_feature_file(path):
    """Fixed synthetic CLIP-like features: clusters per class, poor class texts (so the cache
    matters), 10 augmented views of every image, interleaved labels, a val and a test split."""
    from vlclassify.data import save_precomputed

    g = torch.Generator().manual_seed(11)
    d = 16
    centers = torch.randn(TIP_CLASSES, d, generator=g)
    train_y = _interleaved(TIP_TRAIN, 5)
    val_y = _interleaved({c: 12 for c in range(TIP_CLASSES)}, 6)
    test_y = _interleaved({c: 15 for c in range(TIP_CLASSES)}, 7)
    y = torch.tensor(train_y + val_y + test_y)
    x = centers[y] + 1.1 * torch.randn(len(y), d, generator=g)
    views = {f"rrc{i}": {"image": x + 0.5 * torch.randn(x.shape, generator=g)} for i in range(10)}
    text = centers + 1.3 * torch.randn(centers.shape, generator=g)
    split = ["train"] * len(train_y) + ["val"] * len(val_y) + ["test"] * len(test_y)
    names = [f"class_{c}" for c in range(TIP_CLASSES)]
    save_precomputed(path, x, y, names, split=split, class_text=text, views=views)
    return x, y, views, text, len(train_y), len(val_y)


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def reference_tip_adapter(train_rows, k, seed, feats, y, text, val_rows, test_rows, s0, s1):
    """Tip-Adapter's protocol on row indices: (sampled rows, (alpha, beta), test logits)."""
    state = random.getstate()
    random.seed(seed)
    groups = defaultdict(list)
    for r in train_rows:
        groups[int(y[r])].append(r)
    picked = []
    for g in groups.values():
        picked += random.sample(g, k) if len(g) >= k else random.choices(g, k=k)
    random.setstate(state)
    raw = torch.stack([feats[f"rrc{i}"][picked] for i in range(10)])  # [10 views, N, D] raw features
    keys = _unit(raw.mean(0))
    values = torch.nn.functional.one_hot(y[picked], TIP_CLASSES).float()
    weights = _unit(text)

    def logits(rows, alpha, beta):
        f = _unit(feats["orig"][rows])
        return 100.0 * f @ weights.T + alpha * torch.exp(-beta * (1 - f @ keys.T)) @ values

    betas = [i * (s0 - 0.1) / 200 + 0.1 for i in range(200)]
    alphas = [i * (s1 - 0.1) / 20 + 0.1 for i in range(20)]
    best_acc, best = 0.0, (0.0, 0.0)
    for beta in betas:
        for alpha in alphas:
            acc = 100 * float((logits(val_rows, alpha, beta).argmax(-1) == y[val_rows]).float().sum()) / len(val_rows)
            if acc > best_acc:
                best_acc, best = acc, (alpha, beta)
    return picked, best, logits(test_rows, *best)


@pytest.mark.parametrize(
    ("presets", "scales", "k"), [("tip-adapter", (7, 3), 4), ("tip-adapter,coop-dtd", (13, 13), 8)]
)
def test_tip_adapter_preset_equals_the_published_search(tmp_path, presets, scales, k):
    from vlclassify.backbones import create_backbone
    from vlclassify.methods import create_method
    from vlclassify.protocols import resolve_presets

    path = tmp_path / "feats.safetensors"
    x, y, views, text, n_train, n_val = _tip_feature_file(path)
    train_rows = list(range(n_train))
    val_rows = list(range(n_train, n_train + n_val))
    test_rows = list(range(n_train + n_val, len(y)))
    picked, (alpha, beta), ref_logits = reference_tip_adapter(
        train_rows,
        k,
        1,
        {"orig": x, **{v: e["image"] for v, e in views.items()}},
        y,
        text,
        val_rows,
        test_rows,
        *scales,
    )
    assert (alpha, beta) != (0.1, 0.1)  # the search decides something here (else the test proves little)

    resolved = resolve_presets(presets, str(path))
    assert resolved.seeds == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short classes
        splits = plan_splits(str(path), shots=k, seed=resolved.seeds[0], protocol=resolved.protocol)
    assert [it.key for it in splits["train"].items] == [f"feats.safetensors#{r}" for r in picked]
    assert len(splits["val"]) == n_val  # the whole val split, not min(K, 4) per class
    toy100 = create_backbone("toy", logit_scale=100.0)
    m = create_method("tip-adapter", toy100, **resolved.options("tip-adapter"))
    m.fit(splits["train"], splits["val"])
    assert m.fit_info["alpha"] == alpha and m.fit_info["beta"] == beta
    assert m.fit_info["alpha_beta_candidates"] == 4000
    got = m.logits(splits["test"])
    assert (got - ref_logits).abs().max() < 1e-4
