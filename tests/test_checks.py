"""The `make check` helpers in scripts/: the docstring count and the docs' broken-reference check."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))


def test_docstring_survey_counts_public_api_and_inherits_from_package_bases(tmp_path):
    _write(tmp_path, "vlclassify/__init__.py", '"""Package."""\n')
    _write(
        tmp_path,
        "vlclassify/base.py",
        '''
        class Base:
            """Documented base."""

            def fit(self):
                """Train."""

            def undocumented(self):
                pass


        def helper():
            def nested():  # not API
                pass


        def _private():
            pass
        ''',
    )
    _write(
        tmp_path,
        "vlclassify/impl.py",
        '''
        from torch import nn

        from .base import Base


        class Impl(Base):
            def fit(self):  # inherits Base.fit's docstring
                pass

            def undocumented(self):  # the base has none either
                pass


        class Net(nn.Module):
            """Documented."""

            def forward(self, x):  # torch's docstring says nothing about this module: not inherited
                return x
        ''',
    )
    _write(tmp_path, "vlclassify/_private_mod.py", "def public_in_private_module():\n    pass\n")
    documented, missing = _script("docstrings").survey(tmp_path)
    assert sorted(documented) == [
        "vlclassify.base.Base",
        "vlclassify.base.Base.fit",
        "vlclassify.impl.Impl.fit",
        "vlclassify.impl.Net",
    ]
    assert sorted(missing) == [
        "vlclassify.base.Base.undocumented",
        "vlclassify.base.helper",
        "vlclassify.impl.Impl",
        "vlclassify.impl.Impl.undocumented",
        "vlclassify.impl.Net.forward",
    ]


def test_docs_flag_broken_docstring_references_only(tmp_path, monkeypatch):
    pytest.importorskip("pdoc", reason="pdoc comes with the `check` extra (make check installs it)")
    import pdoc.doc

    _write(
        tmp_path,
        "refdemo.py",
        '''
        """Module: see `Thing.run`, `Thing.gone`, `nowhere()`, `len()`, `torch.load` and `l`."""


        class Thing:
            """Uses `Thing.run()` and `self.x`."""

            def __init__(self):
                self.size = 1

            def run(self):
                """Reads `Thing.size` and calls `stop()`."""
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("refdemo", None)
    mods = {"refdemo": pdoc.doc.Module.from_name("refdemo")}
    broken = _script("build_docs").broken_references(mods)
    assert broken == [
        "refdemo.Thing.run: docstring refers to `stop()`, which does not exist",
        "refdemo: docstring refers to `Thing.gone`, which does not exist",
        "refdemo: docstring refers to `nowhere()`, which does not exist",
    ]
