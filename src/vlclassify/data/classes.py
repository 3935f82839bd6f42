"""Class lists given by name: `--classes "a,b,c"` or `--classes classes.txt`, and `classes=` in a data spec."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

FILE_SUFFIXES = {".txt", ".csv", ".list", ".names"}  # a value ending so is a file name, never a class list


def check_classes(names: Sequence[str], where: str) -> list[str]:
    """Stripped names; an empty or repeated name is an error naming its position in `where`."""
    out: list[str] = []
    for i, n in enumerate(names, start=1):
        n = str(n).strip()
        if not n:
            raise DataError(f"{where}: class {i} has an empty name")
        if n in out:
            raise DataError(f"{where}: class {n!r} is listed twice (positions {out.index(n) + 1} and {i})")
        out.append(n)
    if not out:
        raise DataError(f"{where}: no classes")
    return out


def check_spellings(names: Sequence[str], where: str) -> None:
    """Labels that differ only in case or surrounding space (`Food` / `food `) are one error naming
    the pair, in fit, eval and update alike: merging them silently would guess which spelling the
    user meant, and keeping both gives two classes that score the same."""
    seen: dict[str, str] = {}
    for n in names:
        k = str(n).strip().casefold()
        if k in seen:
            raise DataError(
                f"{where}: labels {seen[k]!r} and {n!r} differ only in case or surrounding space; use one spelling"
            )
        seen[k] = str(n)


def parse_classes(value: str) -> tuple[list[str], dict[str, str]]:
    """Class names (in order) and their descriptions, from a comma-separated list or a text file.

    A value naming an existing file is read as one class a line, `name: description` allowed
    (split at the first `:`), blank lines and lines starting with `#` ignored. Otherwise the
    value is a comma-separated list of names, without descriptions. Errors name the file and line.
    """
    path = Path(value)
    if path.is_file():
        return _read_class_file(path)
    if "," not in value and (path.suffix.lower() in FILE_SUFFIXES or "/" in value or "\\" in value):
        raise DataError(f"classes {value!r}: no such file (or give a comma-separated list: a,b,c)")
    return check_classes(value.split(","), f"classes {value!r}"), {}


def _read_class_file(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    descriptions: dict[str, str] = {}
    for ln, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, desc = line.partition(":")
        name, desc = name.strip(), desc.strip()
        if not name:
            raise DataError(f"{path}:{ln}: empty class name")
        if name in first_line:
            raise DataError(f"{path}:{ln}: class {name!r} is already listed on line {first_line[name]}")
        first_line[name] = ln
        names.append(name)
        if desc:
            descriptions[name] = desc
    if not names:
        raise DataError(f"{path}: no classes (one class a line, 'name: description' allowed)")
    return names, descriptions
