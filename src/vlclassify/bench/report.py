"""Every benchmark writes the same pair: `<stem>.json` (all runs) and `<stem>.md` (the table)."""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_path, write_json


def write_json_and_markdown(result: dict, out_dir: str | Path, stem: str, markdown: str) -> tuple[Path, Path]:
    """Write a benchmark's result JSON and its Markdown beside it, each atomically; returns both paths."""
    out_dir = Path(out_dir)
    jp, mp = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(jp, result)
    with atomic_path(mp) as tmp:
        tmp.write_text(markdown)
    return jp, mp
