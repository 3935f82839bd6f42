"""Multi-label classification as phrase grounding: one prompt listing every class, and the map
from each class to the prompt tokens that spell it (DiCLS sec. 3.1, after GLIP).

    prompt, spans = build_prompt(["scab", "healthy", "rust"], prefix="Detect: ", suffix=".")
    # "Detect: scab, healthy, rust."
    mask = phrase_token_mask(prompt, spans, names, token_strings)   # [C, L] 0/1

Tokens are matched by their text, not by re-tokenising, so it works for any tokenizer whose
token strings spell the input (WordPiece `##`, BPE `</w>` / `Ġ`, SentencePiece `▁`, or plain
words): both sides are reduced to lower-case letters and digits and compared character by
character, and a class must start and end on token boundaries.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

import torch

from ..errors import ConfigError

_SPECIAL = re.compile(r"^(\[[A-Za-z_]+\]|<\|?[A-Za-z_]+\|?>|</?s>)$")  # [CLS], <|endoftext|>, <s>, <pad>
_MARKERS = ("##", "</w>", "Ġ", "▁", "Ċ")


def normalize_text(s: str) -> str:
    """Lower-case letters and digits only, accents stripped (what an uncased tokenizer keeps)."""
    s = unicodedata.normalize("NFKD", s)
    return "".join(ch for ch in s.lower() if ch.isalnum() and not unicodedata.combining(ch))


def normalize_token(tok: str) -> str:
    """A tokenizer token -> its plain lower-case text ("" for special tokens), to match phrases across tokenizers."""
    if not tok or _SPECIAL.match(tok):
        return ""
    for m in _MARKERS:
        tok = tok.replace(m, "")
    return normalize_text(tok)


def build_prompt(
    classnames: Sequence[str],
    prefix: str = "Detect: ",
    suffix: str = ".",
    separator: str = ", ",
    descriptions: Mapping[str, str] | None = None,
    description_format: str = "{name} ({description})",
) -> tuple[str, list[tuple[int, int]]]:
    """prefix + body + suffix, the body listing the classes (each optionally with its description).

    Returns the prompt and each class name's character span in it.
    """
    descriptions = descriptions or {}
    unknown = sorted(set(descriptions) - set(classnames))
    if unknown:
        raise ConfigError(f"prompt descriptions given for unknown class(es): {', '.join(unknown)}")
    if "{name}" not in description_format:
        raise ConfigError(f"description_format must contain '{{name}}', got {description_format!r}")
    parts, spans, pos = [], [], len(prefix)
    for i, name in enumerate(classnames):
        if not normalize_text(name):
            raise ConfigError(f"class name {name!r} has no letters or digits to find in the prompt")
        if i:
            parts.append(separator)
            pos += len(separator)
        entry = description_format.format(name=name, description=descriptions[name]) if descriptions.get(name) else name
        at = entry.index(name)
        spans.append((pos + at, pos + at + len(name)))
        parts.append(entry)
        pos += len(entry)
    return prefix + "".join(parts) + suffix, spans


def phrase_token_mask(
    prompt: str,
    spans: Sequence[tuple[int, int]],
    classnames: Sequence[str],
    token_strings: Sequence[str],
    valid: Sequence[bool] | None = None,
) -> torch.Tensor:
    """[C, L] float 0/1: row c marks the tokens that spell class c at its span in the prompt.

    The expected position comes from the span; if the tokenizer dropped or changed characters
    before it, the nearest exact occurrence on token boundaries is used. A class that cannot be
    found (unknown-token replacement, truncation, a tokenizer that merges it with a neighbour)
    is an error naming the class.
    """
    L = len(token_strings)
    valid = [True] * L if valid is None else list(valid)
    norm = [normalize_token(t) if ok else "" for t, ok in zip(token_strings, valid)]
    starts, ends, pos = {}, {}, 0
    for i, t in enumerate(norm):
        if t:
            starts[pos] = i
            ends[pos + len(t)] = i
            pos += len(t)
    joined = "".join(norm)
    mask = torch.zeros(len(classnames), L)
    for c, (name, (a, _b)) in enumerate(zip(classnames, spans)):
        target = normalize_text(name)
        expected = len(normalize_text(prompt[:a]))
        hits = [
            m.start()
            for m in re.finditer(f"(?={re.escape(target)})", joined)
            if m.start() in starts and m.start() + len(target) in ends
        ]
        if not hits:
            raise ConfigError(
                f"class {name!r} cannot be found among the prompt's tokens ({len([t for t in norm if t])} tokens; "
                "unknown characters, truncation, or a tokenizer that merges it with a neighbour)"
            )
        off = min(hits, key=lambda h: abs(h - expected))
        for i in range(starts[off], ends[off + len(target)] + 1):
            if norm[i]:
                mask[c, i] = 1.0
    return mask
