"""Build the API reference (pdoc) from the docstrings of the public API; any problem fails the build.

    python scripts/build_docs.py                 # writes docs/api/_build/index.html
    python scripts/build_docs.py --out /tmp/api

Documented: the package itself (the names `vlclassify/__init__.py` exports) and the public packages
`PACKAGES` with every public submodule. "Warnings as errors": a warning pdoc raises while reading
or rendering a module (an import that fails, an annotation it cannot parse, ...) fails the build,
and so does a broken reference in a docstring: a backticked dotted name whose head is documented
(`vlclassify.x.y`, or a class/function of the module or class the docstring belongs to, as in
`Backbone.encode_image`) but whose rest does not exist, or a backticked `name()` that is neither a
builtin nor a function or method documented anywhere in the reference.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import pkgutil
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pdoc
import pdoc.doc
import pdoc.render

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["backbones", "methods", "data", "features", "training", "metrics"]
CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")  # single-backtick spans (fenced and ``double`` ones excluded)
DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?$")
CALL = re.compile(r"^[A-Za-z_]\w*\(\)$")


def module_names() -> list[str]:
    names = ["vlclassify"]
    for pkg in PACKAGES:
        mod = importlib.import_module(f"vlclassify.{pkg}")
        names.append(mod.__name__)
        for info in pkgutil.walk_packages(mod.__path__, f"{mod.__name__}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return names


def walk(ns: pdoc.doc.Namespace) -> Iterator[pdoc.doc.Doc]:
    """Every documented object under a module or class, depth first, own members only."""
    for m in ns.own_members:
        if m.name.startswith("_"):
            continue
        yield m
        if isinstance(m, pdoc.doc.Class):
            yield from walk(m)


def resolve(ref: str, doc: pdoc.doc.Doc, modules: dict[str, pdoc.doc.Module]) -> bool | None:
    """True if `ref` names a documented object, False if it is broken, None if it is not ours to judge."""
    ref = ref.removesuffix("()")
    parts = ref.split(".")
    mod = modules[doc.modulename]
    scopes = [doc.qualname.rpartition(".")[0], ""] if doc.qualname else [""]  # enclosing class, then module
    if parts[0] == "vlclassify":
        for i in range(len(parts), 0, -1):
            name = ".".join(parts[:i])
            try:
                obj = importlib.import_module(name)
            except ImportError:
                continue
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
        return False
    for scope in scopes:
        head = f"{scope}.{parts[0]}" if scope else parts[0]
        target = mod.get(head)
        if target is None or target.name.startswith("_"):
            continue
        if len(parts) == 1:
            return True
        if mod.get(f"{head}.{'.'.join(parts[1:])}") is not None:
            return True
        obj = target.obj  # members pdoc does not list (instance attributes set in __init__, ...)
        for attr in parts[1:]:
            if not hasattr(obj, attr) and f"self.{attr}" not in _source(obj):
                return False
            obj = getattr(obj, attr, None)
        return True
    if len(parts) == 1:  # `name()`: a builtin, or a function or method documented somewhere in the reference
        return hasattr(builtins, ref) or ref in _all_names(tuple(modules.values()))
    return None


@functools.cache
def _all_names(modules: tuple[pdoc.doc.Module, ...]) -> frozenset[str]:
    return frozenset(d.name for m in modules for d in walk(m))


def _source(obj: object) -> str:
    import inspect

    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def broken_references(modules: dict[str, pdoc.doc.Module]) -> list[str]:
    out = []
    for mod in modules.values():
        for doc in [mod, *walk(mod)]:
            if doc.taken_from[0] != doc.modulename and doc is not mod:
                continue  # re-exported: checked where it is defined
            for ref in CODE.findall(doc.docstring):
                if not (DOTTED.match(ref) or CALL.match(ref)):
                    continue
                if resolve(ref, doc, modules) is False:
                    out.append(f"{doc.fullname}: docstring refers to `{ref}`, which does not exist")
    return sorted(set(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "api" / "_build")
    args = ap.parse_args()
    import vlclassify  # heavy imports (torch) before the warning capture: their warnings are not ours

    pdoc.render.configure(docformat="markdown", show_source=False, footer_text=f"vlclassify {vlclassify.__version__}")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = module_names()
        modules = {n: pdoc.doc.Module.from_name(n) for n in names}
        pdoc.pdoc(*names, output_directory=tmp)
        problems = [f"warning: {w.message}" for w in caught]
    problems += broken_references(modules)
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"docs: FAIL: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"docs: {len(names)} modules -> {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
