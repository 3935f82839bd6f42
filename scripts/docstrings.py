"""Count the public functions and classes of src/vlclassify without a docstring (static: no imports).

    python scripts/docstrings.py              # report: counts, exit 0
    python scripts/docstrings.py --list       # ... and name every undocumented one
    python scripts/docstrings.py --require    # exit 1 if any public function or class lacks one

Public: a module-level function or class, or a method of such a class, whose name does not start
with `_`, in a module whose path has no `_`-prefixed part (package `__init__.py` files count).
A method that overrides a documented method of a base class defined in this package counts as
documented: the API reference shows the inherited docstring. Nested functions are not API.
`--issue-count` prints the count the issue quoted instead (every `def`/`class` with a public name,
nested ones included).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def public_modules(src: Path) -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted((src / "vlclassify").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        out.append((".".join(parts), ast.parse(path.read_text(encoding="utf-8"), str(path))))
    return out


def _base_names(cls: ast.ClassDef) -> list[str]:
    names = []
    for b in cls.bases:
        node = b.value if isinstance(b, ast.Subscript) else b  # Generic[T] -> Generic
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
    return names


def survey(src: Path = SRC) -> tuple[list[str], list[str]]:
    """(documented, undocumented) qualified names of the public functions, classes and methods."""
    modules = public_modules(src)
    classes: dict[str, list[ast.ClassDef]] = {}  # simple name -> every class of that name in the package
    for _, tree in modules:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(node)

    def inherited_doc(cls: ast.ClassDef, method: str, seen: set[int]) -> bool:
        for base in _base_names(cls):
            for b in classes.get(base, []):
                if id(b) in seen:
                    continue
                seen.add(id(b))
                for n in b.body:
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == method:
                        if ast.get_docstring(n):
                            return True
                if inherited_doc(b, method, seen):
                    return True
        return False

    documented, missing = [], []
    for modname, tree in modules:
        for node in tree.body:
            if not isinstance(node, Def) or node.name.startswith("_"):
                continue
            (documented if ast.get_docstring(node) else missing).append(f"{modname}.{node.name}")
            if not isinstance(node, ast.ClassDef):
                continue
            for m in node.body:
                if not isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) or m.name.startswith("_"):
                    continue
                ok = bool(ast.get_docstring(m)) or inherited_doc(node, m.name, {id(node)})
                (documented if ok else missing).append(f"{modname}.{node.name}.{m.name}")
    return documented, missing


def issue_count(src: Path = SRC) -> tuple[int, int]:
    """(with a docstring, total) over every def/class with a public name, nested ones included."""
    total = doc = 0
    for path in (src / "vlclassify").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, Def) and not node.name.startswith("_"):
                total += 1
                doc += ast.get_docstring(node) is not None
    return doc, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require", action="store_true", help="fail if any public function or class lacks a docstring")
    ap.add_argument("--list", action="store_true", help="name every undocumented one")
    ap.add_argument("--issue-count", action="store_true", help="the issue's count (nested functions included)")
    args = ap.parse_args()
    if args.issue_count:
        doc, total = issue_count()
        print(f"docstrings (issue's count): {doc} of {total} public defs/classes have one")
        return 0
    documented, missing = survey()
    total = len(documented) + len(missing)
    print(f"docstrings: {len(documented)} of {total} public functions/classes/methods have one, {len(missing)} do not")
    if args.list or (args.require and missing):
        for name in missing:
            print(f"  missing: {name}")
    if args.require and missing:
        print("docstrings: FAIL: every public function and class needs a docstring that says what it is for")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
