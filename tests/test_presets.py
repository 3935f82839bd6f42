"""Presets (issue 11): the registry, what each preset sets, the automatic CoOp dataset preset,
the protocol's data side (full val, sampling with replacement, class names, the test split), the
augmented views, Tip-Adapter-F's epoch views, and the CLI (fit / bench fewshot --preset, methods --presets)."""

import dataclasses
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
from vlclassify.data import image_folder, load_data, plan_splits, save_precomputed
from vlclassify.data.plan import Protocol, prepare_data
from vlclassify.errors import ConfigError, DataError
from vlclassify.features import extract_features
from vlclassify.features.extract import RRC_SCALE, RRC_SIZE, VIEWS
from vlclassify.methods import create_method
from vlclassify.methods.templates import dataset_templates
from vlclassify.protocols import (
    CMM_PAPER,
    COOP_DATASETS,
    PRESETS,
    list_presets,
    preset_for_data,
    resolve_presets,
)

runner = CliRunner()
COOP_NAMES = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101"]
COOP_NAMES += ["FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101"]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ---- the registry and what each preset sets -------------------------------------------------


def test_every_coop_dataset_has_a_preset_and_every_preset_builds_its_methods(toy):
    assert sorted(d.coop for d in COOP_DATASETS) == sorted(COOP_NAMES)
    assert set(list_presets()) == {"tip-adapter"} | {f"coop-{d.name}" for d in COOP_DATASETS}
    for name in list_presets():
        p = PRESETS.get(name)
        assert p.description and "\n" not in p.description
        r = resolve_presets(name)
        for method in set(p.options) | {"zero-shot"}:  # every option a preset sets exists, with the right type
            create_method(method, toy, **r.options(method))
        if p.templates:
            assert p.templates in dataset_templates()


def test_tip_adapter_values_are_its_yaml_per_dataset():
    """Spot checks against Tip-Adapter's configs/*.yaml (search_scale, init_alpha, train_epoch)."""
    want = {"oxfordpets": (7, 3, 1.17, 20), "caltech101": (12, 5, 3, 20), "dtd": (13, 13, 2, 20)}
    want |= {"flowers102": (50, 50, 10, 20), "fgvcaircraft": (30, 30, 5, 20), "eurosat": (12, 10, 2, 100)}
    for name, (s0, s1, init_alpha, epochs) in want.items():
        o = resolve_presets(f"coop-{name}").options("tip-adapter-f")
        assert len(o["beta_grid"]) == 200 and len(o["alpha_grid"]) == 20
        assert o["beta_grid"][0] == o["alpha_grid"][0] == 0.1
        assert o["beta_grid"][-1] == pytest.approx(199 * (s0 - 0.1) / 200 + 0.1) and o["beta_grid"][-1] < s0
        assert o["alpha_grid"][-1] == pytest.approx(19 * (s1 - 0.1) / 20 + 0.1) and o["alpha_grid"][-1] < s1
        assert o["train_alpha"] == o["alpha"] == init_alpha and o["train_beta"] == 1 and o["epochs"] == epochs


def test_tip_adapter_init_values_are_off_its_grids():
    """Tip-Adapter keeps the first strict improvement (ties: the first in beta-major order); a
    selection rule that gives ties to the method's default pair can only do that when the pair is
    a grid point, so each preset's (init_alpha, init_beta) must not be one."""
    for name in list_presets():
        o = resolve_presets(name).options("tip-adapter")
        if "beta_grid" in o:
            assert (o["alpha"], o["beta"]) not in [(a, b) for b in o["beta_grid"] for a in o["alpha_grid"]], name


def test_cmm_and_vt_clip_get_their_papers_settings_and_every_method_the_dataset_prompt(toy):
    r = resolve_presets("coop-eurosat")
    cmm = create_method("cmm", toy, **r.options("cmm"))
    assert cmm.templates == ["a centered satellite photo of {}."]
    given = {**dataclasses.asdict(cmm.config.train), **dataclasses.asdict(cmm.config)}  # training options nest
    assert {k: given[k] for k in CMM_PAPER} == CMM_PAPER
    assert CMM_PAPER["steps"] == 16000 and CMM_PAPER["batch_size"] == 8 and CMM_PAPER["lr"] == 1e-4
    vt = create_method("vt-clip", toy, **r.options("vt-clip"))
    assert (vt.config.train.batch_size, vt.config.train.lr, vt.config.heads) == (32, 2e-3, 2)
    assert create_method("zero-shot", toy, **r.options("zero-shot")).config.templates == "eurosat"
    assert r.options("linear-probe") == {}  # no templates, no paper settings
    assert resolve_presets("coop-imagenet").options("tip-adapter")["templates"] == "imagenet"
    assert len(dataset_templates()["imagenet"]) == 7  # ImageNet: the 7-template ensemble


def test_resolution_order_and_errors():
    r = resolve_presets("tip-adapter", "/data/pets/split_zhou_OxfordPets.json")
    assert r.names == ["tip-adapter", "coop-oxfordpets"] and r.automatic == "coop-oxfordpets"
    o = r.options("tip-adapter")
    assert o["beta_grid"][-1] < 7 and o["views"] == [f"rrc{i}" for i in range(10)]  # the dataset's grid wins
    assert resolve_presets("coop-dtd,tip-adapter").names == ["tip-adapter", "coop-dtd"]
    assert resolve_presets("none", "x/split_zhou_OxfordPets.json").presets == []
    assert resolve_presets("tip-adapter,none", "x/split_zhou_OxfordPets.json").names == ["tip-adapter"]
    assert resolve_presets("coop-dtd", "x/split_zhou_OxfordPets.json").names == ["coop-dtd"]  # named wins
    assert resolve_presets(None, "fashion-mnist").presets == []
    assert preset_for_data("x/split_zhou_DescribableTextures.json?root=/img").name == "coop-dtd"
    assert preset_for_data("x/split_zhou_ImageNet.json") is None  # CoOp's ImageNet is folders: by name
    with pytest.raises(ConfigError, match="unknown preset 'tip'"):
        resolve_presets("tip")
    with pytest.raises(ConfigError, match="one dataset preset"):
        resolve_presets("coop-dtd,coop-eurosat")
    default = resolve_presets(None).protocol
    assert default == Protocol() and default.val == "fewshot" and not default.repeat  # the honest default


# ---- the protocol's data side ---------------------------------------------------------------


@pytest.fixture
def coop_split(tmp_path):
    """CoOp's OxfordPets split file (by name) over tiny real images, with short classes."""
    names = ["abyssinian", "american_bulldog", "basset_hound"]
    sizes = {"train": {0: 9, 1: 2, 2: 6}, "val": {0: 5, 1: 3, 2: 4}, "test": {0: 3, 1: 3, 2: 3}}
    rng = np.random.default_rng(0)
    split = {}
    for s, counts in sizes.items():
        labels = [c for c, n in counts.items() for _ in range(n)]
        rng.shuffle(labels)
        split[s] = [[f"{names[y]}/{s}_{i:02d}.png", int(y), names[y]] for i, y in enumerate(labels)]
    for rows in split.values():
        for rel, y, _ in rows:
            f = tmp_path / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            px = np.clip(
                np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)][y]) + rng.normal(0, 25, (12, 12, 3)), 0, 255
            )
            Image.fromarray(px.astype(np.uint8)).save(f)
    path = tmp_path / "split_zhou_OxfordPets.json"
    path.write_text(json.dumps(split))
    return path, split


def test_full_val_and_sampling_with_replacement(coop_split):
    path, split = coop_split
    state = random.getstate()
    random.seed(1)
    groups = defaultdict(list)
    for row in split["train"]:
        groups[row[1]].append(row[0])
    ref = [p for g in groups.values() for p in (random.sample(g, 4) if len(g) >= 4 else random.choices(g, k=4))]
    random.setstate(state)
    p = _quiet(plan_splits, str(path), shots=4, seed=1, protocol=Protocol(repeat=True, val="full"))
    assert [it.key for it in p["train"].items] == ref  # the stream draws the training items only
    assert [it.key for it in p["val"].items] == [r[0] for r in split["val"]]  # the whole val split
    assert len(set(it.key for it in p["train"].items)) < len(p["train"])  # a short class repeated
    few = _quiet(plan_splits, str(path), shots=4, seed=1)
    assert len(few["val"]) == 4 + 3 + 4 and len(few["train"]) == 4 + 2 + 4  # the default: unchanged
    raw = load_data(str(path))
    with pytest.warns(UserWarning, match="no val split to validate on whole"):
        nv = plan_splits({"train": raw["train"], "test": raw["test"]}, shots=2, seed=1, protocol=Protocol(val="full"))
    assert len(nv["val"]) == 2 + 0 + 2  # min(K, 4) per class of the rest (the bulldog's 2 images train)


def test_class_names_and_test_split_of_coop_imagenet_folders(tmp_path):
    """CoOp's ImageNet layout: images/{train,val}/<wnid>/, classnames.txt one folder up."""
    root = tmp_path / "imagenet"
    for split, n in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            d = root / "images" / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 + 90 * c + i, dtype=np.uint8)).save(d / f"{i}.png")
    (root / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    spec = str(root / "images")
    r = resolve_presets("coop-imagenet", spec)
    raw = prepare_data(spec, r.protocol)
    assert set(raw) == {"train", "test"} and raw["train"].classnames == ["tench", "goldfish"]
    again = prepare_data(raw, r.protocol, spec)  # applying it twice changes nothing
    assert set(again) == {"train", "test"} and again["train"].classnames == ["tench", "goldfish"]
    assert load_data(spec)["train"].classnames == ["n01440764", "n01443537"]  # without the preset: as on disk
    (root / "classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(DataError, match="'n01443537' is not in classnames.txt"):
        prepare_data(spec, r.protocol)


def test_caltech_and_eurosat_renames_and_underscores_on_folders(tmp_path):
    for name in ("Faces", "Leopards", "grand_piano"):
        (tmp_path / "caltech" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), 10 * i + len(name), dtype=np.uint8)).save(
                tmp_path / "caltech" / name / f"{i}.png"
            )
    raw = prepare_data(str(tmp_path / "caltech"), resolve_presets("coop-caltech101").protocol)
    assert raw["all"].classnames == ["face", "leopard", "grand piano"]
    assert image_folder(tmp_path / "caltech")["all"].classnames == ["Faces", "Leopards", "grand_piano"]
    ds = load_data(str(tmp_path / "caltech"))["all"]
    assert prepare_data({"all": ds}, resolve_presets("coop-eurosat").protocol)["all"].classnames[2] == "grand piano"


def test_feature_file_class_text_follows_renamed_classes(tmp_path):
    path = tmp_path / "f.npz"
    save_precomputed(path, torch.randn(6, 4), [0, 1, 2, 0, 1, 2], ["a_b", "c", "d"], class_text=torch.eye(3, 4))
    raw = prepare_data(str(path), Protocol(spaces=True))
    assert raw["all"].classnames == ["a b", "c", "d"]
    assert torch.equal(raw["all"].features.text_for(["a b", "c", "d"]), torch.eye(3, 4))


# ---- augmented views ------------------------------------------------------------------------


def test_random_resized_crop_views_are_reproducible_and_bounded():
    from vlclassify.features.extract import random_resized_crop

    rng = np.random.default_rng(3)
    im = Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
    a, b, c = VIEWS["rrc0"](im), VIEWS["rrc0"](im.copy()), VIEWS["rrc1"](im)
    assert a.size == (RRC_SIZE, RRC_SIZE)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    other = Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
    assert not np.array_equal(np.asarray(VIEWS["rrc0"](other)), np.asarray(a))  # seeded by the image too
    # the crops: a marker pixel grid tells which part of the image each view kept
    xs = np.tile(np.arange(160, dtype=np.uint8), (90, 1))
    ys = np.tile(np.arange(90, dtype=np.uint8)[:, None], (1, 160))
    coords = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1))
    flips = 0
    for i in range(40):
        v = np.asarray(random_resized_crop(i)(coords)).astype(int)
        w = v[:, :, 0].max() - v[:, :, 0].min() + 1
        h = v[:, :, 1].max() - v[:, :, 1].min() + 1
        assert RRC_SCALE[0] * 0.85 <= w * h / (160 * 90) <= 1.0 + 1e-9
        flips += v[0, 0, 0] > v[0, -1, 0]
    assert 8 <= flips <= 32  # about half the views are mirrored


def test_tip_adapter_extracts_the_views_it_names(toy, color_folder, cache):
    raw = load_data(str(color_folder))
    ds = raw["all"]
    m = create_method("tip-adapter", toy, views=["rrc0", "rrc1", "rrc2"], key_mean="raw")
    assert m.training_views() == ("orig", "rrc0", "rrc1", "rrc2")
    m.fit(ds.subset(range(0, 18, 2)), ds.subset(range(1, 18, 2)))
    f = extract_features(toy, ds.subset(range(0, 18, 2)), views=("orig", "rrc0", "rrc1", "rrc2"), cache=cache)
    keys = torch.nn.functional.normalize(
        torch.stack([f.views[v].tensor(m.key_feature) for v in ("rrc0", "rrc1", "rrc2")]).mean(0), dim=-1
    )  # the keys are the views' pooled features or joint embeddings, by the `input` option
    assert torch.allclose(m.head.keys, keys, atol=1e-6)
    assert not torch.allclose(f.views["rrc0"].image, f.image)
    assert create_method("cmm", toy).training_views() == ("orig", "flip")  # others: unchanged
    assert create_method("linear-probe", toy).training_views() == ("orig",)
    with pytest.raises(ConfigError, match="views must be"):
        create_method("tip-adapter", toy, views=["rrc99"])


# ---- Tip-Adapter-F under the preset ---------------------------------------------------------


@pytest.fixture
def view_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    n, d = 30, 16
    y = torch.arange(n) % 3
    x = torch.randn(3, d, generator=g)[y] + 0.8 * torch.randn(n, d, generator=g)
    views = {f"rrc{i}": {"image": x + 0.4 * torch.randn(n, d, generator=g)} for i in range(10)}
    split = ["train"] * 12 + ["val"] * 9 + ["test"] * 9
    path = tmp_path / "views.safetensors"
    save_precomputed(path, x, y, ["p", "q", "r"], split=split, class_text=torch.randn(3, d, generator=g), views=views)
    return path


def test_tip_adapter_f_preset_trains_one_view_an_epoch_unnormalised(toy, view_file):
    r = resolve_presets("tip-adapter")
    splits = _quiet(plan_splits, str(view_file), shots=2, seed=1, protocol=r.protocol)
    m = create_method("tip-adapter-f", toy, **{**r.options("tip-adapter-f"), "epochs": 12})
    assert (m.config.train_alpha, m.config.normalize_keys, m.config.epoch_views) == (1.17, False, "cycle")
    tr = m.encode(splits["train"], training=True)
    batches = m.view_batches(tr)
    stage = m.stages(tr)[0]
    for epoch in (0, 3, 13):
        got = torch.cat([b["image"] for b in batches(stage, epoch, 5)])
        want = tr.features.views[f"rrc{epoch % 10}"].image
        assert got.shape == want.shape  # N rows an epoch, not 10 N
        assert torch.equal(got.sort(0).values, want.sort(0).values)  # one permutation of view e mod 10
    m.fit(splits["train"])  # no validation: the last epoch is kept
    norms = m.head.keys.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-4)  # trained, never re-normalised
    assert m.fit_info["training"]["stages"][0]["rounds"] == 12 and m.fit_info["epoch"] == 12
    m.fit(splits["train"], splits["val"])
    assert len(m.fit_info["training"]["history"]) == 12 and 0 <= m.fit_info["epoch"] <= 12  # chosen on val
    default = create_method("tip-adapter-f", toy, epochs=1)  # the default: orig + flip every epoch
    assert default.config.epoch_views == "all" and default.training_views() == ("orig", "flip")


# ---- CLI ------------------------------------------------------------------------------------


def test_methods_presets_lists_every_preset():
    r = runner.invoke(app, ["methods", "--presets"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for name in list_presets():
        assert name in r.output


def test_fit_on_a_coop_split_file_applies_its_preset_and_records_it(coop_split, tmp_path):
    path, _ = coop_split
    out = tmp_path / "m"
    base = ["fit", "-m", "tip-adapter", "-d", str(path), "--shots", "2", "--backbone", "toy"]
    r = runner.invoke(app, base + ["-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "preset coop-oxfordpets (automatic for split_zhou_OxfordPets.json" in r.output
    cfg = json.loads((out / "config.json").read_text())
    fit = json.loads((out / "fit.json").read_text())
    assert cfg["options"]["templates"] == "oxford_pets" and len(cfg["options"]["beta_grid"]) == 200
    assert cfg["fit_info"]["preset"]["names"] == ["coop-oxfordpets"] == fit["preset"]["names"]
    assert fit["preset"]["automatic"] == "coop-oxfordpets" and fit["seed"] == 1
    assert cfg["classnames"] == ["abyssinian", "american bulldog", "basset hound"]
    # --preset none: today's defaults; --opt still wins over a preset
    out2 = tmp_path / "m2"
    r = runner.invoke(app, base + ["-o", str(out2), "--preset", "none"])
    assert r.exit_code == 0, r.output
    assert json.loads((out2 / "config.json").read_text())["options"]["templates"] == "select7"
    assert json.loads((out2 / "fit.json").read_text())["preset"] is None
    out3 = tmp_path / "m3"
    r = runner.invoke(app, base + ["-o", str(out3), "--opt", 'templates="single"', "--preset", "tip-adapter"])
    assert r.exit_code == 0, r.output
    cfg3 = json.loads((out3 / "config.json").read_text())
    assert cfg3["options"]["templates"] == "single" and cfg3["options"]["key_mean"] == "raw"
    fit3 = json.loads((out3 / "fit.json").read_text())
    assert fit3["preset"]["names"] == ["tip-adapter", "coop-oxfordpets"] and fit3["sizes"]["val"] == 12  # full val
    assert fit3["sizes"]["train"] == 6  # 2 a class, the short one with replacement
    r = runner.invoke(app, ["eval", str(out3)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, base + ["-o", str(tmp_path / "m4"), "--preset", "tip"])
    assert r.exit_code != 0 and "unknown preset 'tip'" in str(r.exception)


def test_eval_replans_a_coop_imagenet_fit(tmp_path):
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 3)):
        for c, wnid in enumerate(("n01", "n02")):
            d = root / "images" / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(np.array([(220, 30, 30), (30, 30, 220)][c]) + rng.normal(0, 20, (10, 10, 3)), 0, 255)
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    (root / "classnames.txt").write_text("n01 red thing\nn02 blue thing\n")
    out = tmp_path / "m"
    args = ["fit", "-m", "zero-shot", "-d", str(root / "images"), "-o", str(out), "--shots", "1"]
    r = runner.invoke(app, args + ["--preset", "coop-imagenet", "--backbone", "toy"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["classnames"] == ["red thing", "blue thing"]
    assert json.loads((out / "fit.json").read_text())["sizes"]["test"] == 6  # ImageNet's val is the test set
    r = runner.invoke(app, ["eval", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "eval-test.json").read_text())["n"] == 6


def test_bench_fewshot_with_the_tip_adapter_preset(view_file, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "fewshot", "-d", str(view_file), "--methods", "tip-adapter,zero-shot", "--shots", "2,4"]
    r = runner.invoke(app, args + ["--preset", "tip-adapter", "--out", str(out), "--backbone", "toy"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "fewshot-views-safetensors.json").read_text())
    assert res["seeds"] == [1] and res["presets"]["names"] == ["tip-adapter"]  # Tip-Adapter's one seed
    runs = {(x["method"], x["shots"]): x for x in res["runs"]}
    assert runs[("tip-adapter", 4)]["n_val"] == 9 and runs[("tip-adapter", 4)]["n_train"] == 12  # full val, repeats
    assert runs[("tip-adapter", 2)]["fit_info"]["alpha_beta_candidates"] == 4000
    args[-1] = "2"
    r = runner.invoke(app, args + ["--preset", "tip-adapter", "--seeds", "2,3", "--out", str(out), "--backbone", "toy"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "fewshot-views-safetensors.json").read_text())["seeds"] == [2, 3]  # --seeds wins
