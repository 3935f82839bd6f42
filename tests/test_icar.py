"""iCAR: cosine/linear heads, the unified contrastive loss, descriptions (file + WordNet), the
text encoder as classifier with open-vocabulary class sets, pairs, save/load. Toy backbone only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlclassify.data import Dataset, load_data
from vlclassify.data.descriptions import (
    WordNet,
    builtin_descriptions,
    class_sentence,
    read_description_file,
    resolve_descriptions,
)
from vlclassify.errors import ConfigError, DataError
from vlclassify.methods import create_method, load_method
from vlclassify.modules.heads import CosineClassifier, LinearClassifier
from vlclassify.modules.losses.contrastive import info_nce, unified_contrastive_loss
from vlclassify.modules.text_tower import TrainableTextTower

FAST = dict(image_epochs=2, joint_epochs=2, min_steps_per_epoch=5, batch_size=16)


def _captioned(tmp_path, n_per_class: int = 6) -> Dataset:
    """Colour images with captions ("a red square 3"), as a CSV manifest."""
    rng = np.random.default_rng(0)
    rows = ["image,label,text"]
    for name, rgb in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
        for i in range(n_per_class):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name},a {name} square number {i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return load_data(str(tmp_path / "m.csv"))["all"]


# ---- shared blocks ----------------------------------------------------------------------------
def test_cosine_and_linear_heads():
    torch.manual_seed(0)
    x = torch.randn(5, 8) * 10
    cos = CosineClassifier(8, 3, tau=0.05)
    z = cos(x)  # [5, 3]
    assert z.shape == (5, 3) and z.abs().max() <= 20.0 + 1e-4  # |cos| / tau <= 1 / 0.05
    assert torch.allclose(cos(2 * x), z, atol=1e-5)  # scale-invariant in the features
    w = torch.randn(4, 8)
    assert cos(x, w).shape == (5, 4)  # weights handed in (text encoder as meta classifier)
    lin = LinearClassifier(8, 3)
    assert not torch.allclose(lin(2 * x), lin(x))  # the linear head is not
    learn = CosineClassifier(8, 0, tau=0.05, learnable_tau=True)
    assert any(p is learn.log_inv_tau for p in learn.parameters())
    with pytest.raises(ValueError, match="no parametric weights"):
        learn(x)


def test_contrastive_loss_hand_made():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # cos = identity matrix; with scale 1 each image's loss is -log(e / (e + 1)) = log(1 + 1/e)
    expect = math.log(1 + math.exp(-1))
    assert info_nce(img, txt, torch.tensor([0, 1]), 1.0).item() == pytest.approx(expect, abs=1e-6)
    # wrong targets: -log(1 / (e + 1))
    assert info_nce(img, txt, torch.tensor([1, 0]), 1.0).item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    # Eq. 6: the mean over all images of both parts (1 classification image + 2 pairs)
    mixed = unified_contrastive_loss(1.0, img[:1], txt, torch.tensor([0]), img, txt, torch.tensor([1, 0]))
    assert mixed["loss"].item() == pytest.approx((expect + 2 * math.log(1 + math.e)) / 3, abs=1e-6)
    assert mixed["loss_cls"].item() == pytest.approx(expect, abs=1e-6)
    assert mixed["loss_pair"].item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    # split heads: the classification part is the parametric head's cross-entropy
    z = torch.tensor([[2.0, 0.0]])
    split = unified_contrastive_loss(1.0, cls_targets=torch.tensor([1]), cls_logits=z)
    assert split["loss"].item() == pytest.approx(math.log(1 + math.exp(2)), abs=1e-6) and "loss_pair" not in split
    with pytest.raises(ValueError, match="at least 2 texts"):
        info_nce(img, txt[:1], torch.tensor([0, 0]), 1.0)


# ---- descriptions -----------------------------------------------------------------------------
def test_description_files(tmp_path):
    js = tmp_path / "d.json"
    js.write_text('{"cat": "a small domesticated feline.", "dog": "a loyal canine", "unicorn": "a myth"}')
    with pytest.warns(UserWarning, match="do not exist.*unicorn"):
        d = read_description_file(js, ["cat", "dog", "bird"])
    assert d == {"cat": "a small domesticated feline", "dog": "a loyal canine"}
    lst = tmp_path / "l.json"
    lst.write_text('[{"class": "cat", "description": "a feline"}]')
    assert read_description_file(lst, ["cat"]) == {"cat": "a feline"}
    cs = tmp_path / "d.csv"
    cs.write_text('class,description\ncat,"a feline, small"\ndog,\n')
    assert read_description_file(cs, ["cat", "dog"]) == {"cat": "a feline, small"}  # empty -> name only
    bad = tmp_path / "b.csv"
    bad.write_text("name,text\ncat,x\n")
    with pytest.raises(DataError, match="'class' and 'description'"):
        read_description_file(bad)
    broken = tmp_path / "x.json"
    broken.write_text("{oops")
    with pytest.raises(DataError, match="invalid JSON"):
        read_description_file(broken)
    assert class_sentence("cat", "a feline") == "a photo of a cat, a feline."
    assert class_sentence("cat", None) == "a photo of a cat."
    fm = builtin_descriptions("fashion-mnist")
    assert len(fm) == 10 and all(len(v.split()) >= 8 for v in fm.values())
    assert len(builtin_descriptions("tuxpaint")) == 15


def _fake_wordnet(folder):
    """A two-synset WordNet with correct byte offsets, as Debian's wordnet-base lays it out."""
    folder.mkdir()
    header = "  1 This is a licence header line.  \n"
    s1 = '{off} 05 n 01 sneaker 0 000 | a canvas shoe with a pliable rubber sole; "he wore sneakers"  \n'
    s2 = "{off} 06 n 02 cat 0 true_cat 0 000 | feline mammal usually having thick soft fur  \n"
    data = header
    off1 = len(data.encode())
    data += s1.format(off=f"{off1:08d}")
    off2 = len(data.encode())
    data += s2.format(off=f"{off2:08d}")
    (folder / "data.noun").write_text(data)
    (folder / "index.noun").write_text(header + f"cat n 1 1 @ 1 0 {off2:08d}  \nsneaker n 1 0 1 0 {off1:08d}  \n")
    return folder


def test_wordnet_lookup(tmp_path):
    wn = WordNet(_fake_wordnet(tmp_path / "wn"))
    assert wn.gloss("sneaker") == "a canvas shoe with a pliable rubber sole"  # example sentence dropped
    assert wn.gloss("Sneakers") == "a canvas shoe with a pliable rubber sole"  # plural, any case
    assert wn.gloss("cats") == "feline mammal usually having thick soft fur"
    assert wn.gloss("unicorn") is None
    d = resolve_descriptions(["cat", "unicorn"], "wordnet", wordnet_dir=tmp_path / "wn")
    assert d == {"cat": "feline mammal usually having thick soft fur"}  # unicorn falls back to its name
    with pytest.raises(ConfigError, match="wordnet-base"):
        WordNet(tmp_path / "nowhere").gloss("cat")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_descriptions(["cat"], "encyclopedia")


# ---- the method -------------------------------------------------------------------------------
def test_text_tower_starts_as_backbone_and_memo_follows_weights(toy):
    tower = TrainableTextTower(toy.split(None, 1), proj=True).eval()
    texts = ["a red square", "a blue thing", "a red square", "x"]
    with torch.no_grad():
        assert torch.allclose(tower(texts), toy.encode_text(texts).embeds, atol=1e-6)  # padded per batch
        assert set(tower._cache) == set(texts)  # the trunk ran once per distinct text
        before = tower(texts).clone()
        tower.proj.weight.add_(0.5)  # in-place change: the memo must not serve stale embeddings
        assert not torch.allclose(tower(texts), before)
    own, shared = tower.top.word_blocks[0].fc.weight, toy.word_blocks[0].fc.weight
    assert own.data_ptr() != shared.data_ptr()  # the top is a copy; the backbone is untouched


@pytest.mark.parametrize("head", ["text", "linear"])
def test_fit_save_load_and_new_classes(toy, cache, tmp_path, head):
    ds = _captioned(tmp_path)
    m = create_method("icar", toy, head=head, **FAST)
    m.fit(ds, ds)
    assert m.fit_info["n_pairs"] == len(ds)  # pairs=auto: the items' own captions
    assert all("train_loss_cls" in r and "train_loss_pair" in r for r in m.fit_info["losses"])  # mixed batches
    p = m.predict_proba(ds)
    assert p.shape == (len(ds), 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    m.save_pretrained(tmp_path / "model")
    m2 = load_method(tmp_path / "model")
    assert np.allclose(m2.predict_proba(ds), p, atol=1e-6)
    # Open vocabulary: new class names at inference change the output size.
    m2.set_classes(["red", "green", "blue", "purple"], {"purple": "a mix of red and blue"})
    assert m2.predict_proba(ds).shape == (len(ds), 4)
    assert "purple" in m2.descriptions
    m2.save_pretrained(tmp_path / "model4")
    m3 = load_method(tmp_path / "model4")
    assert m3.classnames[-1] == "purple" and np.allclose(m3.predict_proba(ds), m2.predict_proba(ds), atol=1e-6)


def test_cosine_vs_linear_switch_and_training_moves_text(toy, cache, tmp_path):
    ds = _captioned(tmp_path)
    for head, module in (("linear", LinearClassifier), ("cosine", CosineClassifier)):
        m = create_method("icar", toy, head=head, **FAST)
        m.fit(ds, ds)
        assert isinstance(m.head.linear if head == "linear" else m.head.cos, module)
        assert (m.head.linear is None) == (head == "cosine")
        z = m.logits(ds)
        if head == "cosine":
            assert z.abs().max() <= 1 / 0.05 + 1e-4
    m = create_method("icar", toy, **FAST)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    m.fit(ds)  # no validation: every stage keeps its last round
    own = m.head.text.top.word_blocks[0].fc.weight
    assert not torch.equal(own, toy.word_blocks[0].fc.weight)  # the text encoder trained (its copy)...
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())  # ...the shared backbone did not
    assert m.fit_info["tau"] == pytest.approx(0.05)


def test_learns_separable_classes(toy, cache, tmp_path):
    ds = _captioned(tmp_path, n_per_class=8)
    m = create_method(
        "icar",
        toy,
        image_epochs=6,
        joint_epochs=2,
        min_steps_per_epoch=10,
        batch_size=16,
        lr=3e-2,
        pairs="none",
    )
    zero = create_method("icar", toy).set_classes(ds.classnames)
    m.fit(ds, ds)
    acc = (m.predict(ds) == ds.labels()).mean()
    assert acc >= 0.9 and acc > (zero.predict(ds) == ds.labels()).mean()


def test_finetune_on_new_classes(toy, cache, tmp_path):
    ds = _captioned(tmp_path)
    m = create_method("icar", toy, head="linear", **FAST)
    m.fit(ds.subset([i for i, it in enumerate(ds.items) if it.label != 2]), None)
    m.set_classes(["red", "green"])  # a subset/new list -> text classifier, not the parametric head
    assert not m._uses_parametric_head()
    new = m.clone()
    new.finetune(ds, ds)
    assert new.predict_proba(ds).shape == (len(ds), 3) and new.fit_info["finetuned"]
    assert m.classnames == ["red", "green"]  # the clone left the original alone


def test_bad_input(toy, cache, tmp_path):
    ds = _captioned(tmp_path)
    m = create_method("icar", toy, **FAST)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        m.set_classes(["red"])
    one = Dataset(items=[it for it in ds.items if it.label == 0], classnames=["red"], name="one")
    with pytest.raises(DataError, match="at least 2 classes"):
        m.fit(one)
    # Empty captions are skipped with a warning naming one; only empty captions is an error.
    from dataclasses import replace

    holes = Dataset(
        items=[replace(it, text="  ") if i % 2 else it for i, it in enumerate(ds.items)],
        classnames=ds.classnames,
        name="holes",
    )
    with pytest.warns(UserWarning, match="empty caption"):
        m.use_pairs(holes).fit(ds, None)
    assert m.fit_info["n_pairs"] == len(ds) // 2
    blank = Dataset(items=[replace(it, text="") for it in ds.items], classnames=ds.classnames, name="blank")
    with pytest.raises(DataError, match="empty captions"):
        m.use_pairs(blank).fit(ds, None)
    with pytest.raises(DataError, match="pairs=self but no training item"):
        create_method("icar", toy, pairs="self", **FAST).fit(blank)
    with pytest.raises(ConfigError, match="head must be"):
        create_method("icar", toy, head="mlp")
    unknown = tmp_path / "desc.json"
    unknown.write_text('{"red": "the colour of blood", "magenta": "a purplish red"}')
    with pytest.warns(UserWarning, match="magenta"):
        create_method("icar", toy, descriptions=str(unknown)).set_classes(["red", "green"])


def test_pairs_from_the_classification_source_stay_in_train(toy, cache, tmp_path):
    """pairs=<the same manifest>: only the training split's captions, never val/test images."""
    ds = _captioned(tmp_path)
    train = ds.subset(list(range(0, len(ds), 2)))
    val = ds.subset(list(range(1, len(ds), 2)))
    m = create_method("icar", toy, pairs=str(tmp_path / "m.csv"), **FAST)
    with pytest.warns(UserWarning, match="overlaps the classification data"):
        m.fit(train, val)
    assert m.fit_info["n_pairs"] == len(train)


def test_keeps_the_start_when_training_does_not_beat_it_on_validation(toy, cache, tmp_path):
    from dataclasses import replace

    ds = _captioned(tmp_path, n_per_class=8)
    m = create_method(
        "icar",
        toy,
        image_epochs=6,
        joint_epochs=1,
        min_steps_per_epoch=10,
        batch_size=16,
        lr=3e-2,
        pairs="none",
    )
    m.fit(ds, ds)
    before = m.predict_proba(ds)
    assert (before.argmax(1) == ds.labels()).mean() >= 0.9
    wrong = Dataset(
        items=[replace(it, label=(it.label + 1) % 3) for it in ds.items], classnames=ds.classnames, name="wrong"
    )
    m.finetune(wrong, ds)  # training on wrong labels can only lose validation accuracy
    start = float((before.argmax(1) == ds.labels()).mean())  # the finetune's round 0
    rounds = [r["val_score"] for r in m.fit_info["training"]["history"]]
    assert rounds and max(rounds) <= start and min(rounds) < start  # the rounds on wrong labels lost
    # the start is kept exactly when no round matches it (ties go to the later round)
    assert m.fit_info["kept_start"] == (max(rounds) < start)
    if m.fit_info["kept_start"]:
        assert np.allclose(m.predict_proba(ds), before, atol=1e-6)


def test_bench_task_runs_on_held_out_classes(toy, cache, tmp_path):
    """The benchmark's protocol end to end on toy data: seen-class fit, held-out zero-shot and 1-shot."""
    from conftest import load_study
    from vlclassify.features import extract_features
    from vlclassify.methods import Encoded

    study = load_study("icar")
    VARIANTS, Task, class_subset, run_task = study.VARIANTS, study.Task, study.class_subset, study.run_task
    ds = _captioned(tmp_path, n_per_class=6)
    enc = Encoded(ds, extract_features(toy, ds, cache=cache, progress=False))
    sub = class_subset(enc, ["red", "blue"])
    assert sub.dataset.classnames == ["red", "blue"] and set(sub.dataset.labels()) == {0, 1}
    seen, held = class_subset(enc, ["red", "green"]), class_subset(enc, ["blue", "green"])
    task = Task("toy", 1, ["red", "green"], ["blue", "green"], seen, seen, seen, held, held, pairs=None)
    rows = [v for v in VARIANTS if v.label.startswith(("backbone zero-shot, name only", "iCAR:", "linear probe"))]
    runs = run_task(toy, task, rows, [1], cache, dict(FAST), log=lambda s: None)
    assert [r["variant"] for r in runs] == [v.label for v in rows]
    for r in runs:
        assert 0.0 <= r["seen_acc"] <= 1.0 and 0.0 <= r["1_shot_acc"] <= 1.0
    assert "zero_shot_acc" in runs[0] and "zero_shot_acc" not in runs[1]  # the probe has no zero-shot
