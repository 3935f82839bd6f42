"""Class descriptions: from a user file, the package's built-in ones, or WordNet glosses (offline).

A class sentence is "prompt + class name + description" (iCAR §3.2): the description tells the
text encoder which "jack" or "plant" is meant. Sources, in the order `resolve_descriptions` tries
them for `source="auto"`: the built-in file for a known dataset, then WordNet. A class with no
description anywhere falls back to its name alone.

    JSON:  {"sneaker": "a low athletic shoe with a rubber sole", ...}
           or [{"class": "sneaker", "description": "..."}, ...]
    CSV:   class,description   (header row; `name` or `label` also accepted for the first column)

WordNet is read from Debian's `wordnet-base` files (`index.noun` + `data.noun`); the folder is
`$VLCLASSIFY_WORDNET`, else `/usr/share/wordnet`, or passed explicitly.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, DataError

WORDNET_DIR = "/usr/share/wordnet"
BUILTIN = {"fashion-mnist": "fashion_mnist_descriptions.json", "tuxpaint": "tuxpaint_descriptions.json"}
SOURCES = ("auto", "none", "builtin", "wordnet")  # or a path to a JSON/CSV file


def _clean(text: str) -> str:
    return " ".join(str(text).split()).strip().rstrip(".").strip()


def read_description_file(path: str | os.PathLike, classnames: Sequence[str] | None = None) -> dict[str, str]:
    """class -> description from a JSON or CSV file; names not in `classnames` are warned about and dropped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: description file not found")
    suffix = p.suffix.lower()
    out: dict[str, str] = {}
    if suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict):
            rows = list(obj.items())
        elif isinstance(obj, list):
            rows = []
            for i, r in enumerate(obj):
                if not isinstance(r, dict) or "description" not in r or not ({"class", "name"} & set(r)):
                    raise DataError(f"{p}: entry {i} must be an object with 'class' and 'description'")
                rows.append((r.get("class", r.get("name")), r["description"]))
        else:
            raise DataError(f"{p}: expected an object {{class: description}} or a list of {{class, description}}")
        for name, desc in rows:
            if not isinstance(desc, str):
                raise DataError(f"{p}: description of {name!r} must be a string, got {type(desc).__name__}")
            out[str(name)] = desc
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [h.strip().lower() for h in (reader.fieldnames or [])]
            key = next((k for k in ("class", "name", "label") if k in fields), None)
            if key is None or "description" not in fields:
                raise DataError(f"{p}: CSV needs a header with 'class' and 'description' columns, got {fields}")
            for line, row in enumerate(reader, start=2):
                row = {k.strip().lower(): v for k, v in row.items() if k is not None}
                name = (row.get(key) or "").strip()
                if not name:
                    raise DataError(f"{p}: row {line}: empty class name")
                out[name] = row.get("description") or ""
    else:
        raise DataError(f"{p}: description file must be .json or .csv")
    out = {k: _clean(v) for k, v in out.items() if _clean(v)}
    if classnames is not None:
        unknown = sorted(set(out) - set(classnames))
        if unknown:
            warnings.warn(
                f"{p}: {len(unknown)} description(s) name classes that do not exist and are ignored: "
                f"{', '.join(unknown)} (classes: {', '.join(classnames)})",
                stacklevel=2,
            )
        out = {k: v for k, v in out.items() if k in set(classnames)}
    return out


def builtin_descriptions(dataset: str) -> dict[str, str]:
    """The descriptions shipped with the package for a built-in dataset (empty if none)."""
    fname = BUILTIN.get(dataset)
    if not fname:
        return {}
    text = resources.files("vlclassify").joinpath("resources", fname).read_text(encoding="utf-8")
    return {k: _clean(v) for k, v in json.loads(text).items()}


class WordNet:
    """Noun glosses from the WordNet database files (index.noun + data.noun), first sense first."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder or os.environ.get("VLCLASSIFY_WORDNET", WORDNET_DIR))
        self.index_path, self.data_path = self.folder / "index.noun", self.folder / "data.noun"
        self._index: dict[str, list[int]] | None = None

    def available(self) -> bool:
        """Whether the WordNet index and data files exist (the Debian package is optional)."""
        return self.index_path.is_file() and self.data_path.is_file()

    def _load_index(self) -> dict[str, list[int]]:
        if self._index is None:
            if not self.available():
                raise ConfigError(
                    f"{self.folder}: no WordNet index.noun/data.noun; install Debian's wordnet-base "
                    "(`make data`) or set VLCLASSIFY_WORDNET"
                )
            idx: dict[str, list[int]] = {}
            with self.index_path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(" ") or not line.strip():
                        continue  # licence header
                    parts = line.split()
                    try:
                        n_synsets, n_ptr = int(parts[2]), int(parts[3])
                        offsets = [int(o) for o in parts[6 + n_ptr : 6 + n_ptr + n_synsets]]
                    except (IndexError, ValueError):
                        continue
                    if offsets:
                        idx[parts[0]] = offsets
            self._index = idx
        return self._index

    def _gloss_at(self, offset: int) -> str:
        with self.data_path.open("rb") as f:
            f.seek(offset)
            line = f.readline().decode("utf-8", errors="replace")
        _, _, gloss = line.partition(" | ")
        # A gloss is "definition; "example"; ...": keep the definition.
        return _clean(gloss.split('; "')[0].split(';"')[0])

    def lemmas(self, name: str) -> list[str]:
        """Spellings tried for a class name: as is, with '_' for spaces/hyphens, singular forms."""
        base = name.strip().lower()
        cands = [
            base.replace(" ", "_"),
            base.replace(" ", "_").replace("-", "_"),
            base.replace("-", "").replace(" ", "_"),
        ]
        for c in list(cands):
            if c.endswith("ies"):
                cands.append(c[:-3] + "y")
            if c.endswith("es"):
                cands.append(c[:-2])
            if c.endswith("s"):
                cands.append(c[:-1])
        return list(dict.fromkeys(cands))

    def gloss(self, name: str) -> str | None:
        """The first-sense definition of `name` as a noun, or None if WordNet does not know it."""
        idx = self._load_index()
        for lemma in self.lemmas(name):
            if lemma in idx:
                g = self._gloss_at(idx[lemma][0])
                if g:
                    return g
        return None


@lru_cache(maxsize=4)
def _wordnet(folder: str) -> WordNet:
    return WordNet(folder)


def wordnet_descriptions(classnames: Sequence[str], folder: str | os.PathLike | None = None) -> dict[str, str]:
    """Class name -> its WordNet gloss, for the classes WordNet knows (text for iCAR's class sentences)."""
    wn = _wordnet(str(folder or os.environ.get("VLCLASSIFY_WORDNET", WORDNET_DIR)))
    out = {}
    for c in classnames:
        g = wn.gloss(c)
        if g:
            out[c] = g
    return out


def resolve_descriptions(
    classnames: Sequence[str], source: str = "auto", dataset: str = "", wordnet_dir: str | os.PathLike | None = None
) -> dict[str, str]:
    """class -> description for the classes that have one (the rest fall back to the name).

    source: auto (built-in for `dataset`, then WordNet if installed) | none | builtin | wordnet |
    a path to a JSON/CSV file.
    """
    if source == "none":
        return {}
    if source == "builtin":
        return {c: d for c, d in builtin_descriptions(dataset).items() if c in set(classnames)}
    if source == "wordnet":
        return wordnet_descriptions(classnames, wordnet_dir)
    if source == "auto":
        out = {c: d for c, d in builtin_descriptions(dataset).items() if c in set(classnames)}
        rest = [c for c in classnames if c not in out]
        wn = _wordnet(str(wordnet_dir or os.environ.get("VLCLASSIFY_WORDNET", WORDNET_DIR)))
        if rest and wn.available():
            out.update(wordnet_descriptions(rest, wordnet_dir))
        return out
    if Path(source).suffix.lower() in (".json", ".csv"):
        return read_description_file(source, classnames)
    raise ConfigError(f"descriptions: {source!r} is not one of {', '.join(SOURCES)} nor a .json/.csv file")


def class_sentence(
    name: str,
    description: str | None,
    template: str = "a photo of a {name}, {description}.",
    template_no_desc: str = "a photo of a {name}.",
) -> str:
    """T_i = prompt sentence + class name + description (the name alone when there is none)."""
    if description:
        return template.format(name=name, description=_clean(description))
    return template_no_desc.format(name=name)
