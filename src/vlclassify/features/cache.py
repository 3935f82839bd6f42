"""The feature cache: extract once, reuse across methods and runs.

An entry is a folder `<cache>/features/<key-hash>/` with `features.safetensors` and `meta.json`
holding the full key (backbone identity with a weights fingerprint, dataset fingerprint,
preprocessing, view, fields). Entries are written atomically; on load the stored key must equal
the requested one, so a mismatch (or a damaged entry) is recomputed, never silently reused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_path, default_cache_dir, json_fingerprint

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class FeatureCache:
    def __init__(self, root: str | Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root else default_cache_dir()
        self.enabled = enabled

    def _dir(self, key: dict[str, Any]) -> Path:
        return self.root / "features" / json_fingerprint({**key, "cache_version": CACHE_VERSION})

    def load(self, key: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor] | None:
        """The tensors `names` of the entry for `key`, or None if absent, mismatched or damaged."""
        if not self.enabled:
            return None
        d = self._dir(key)
        meta_p, data_p = d / "meta.json", d / "features.safetensors"
        if not (meta_p.exists() and data_p.exists()):
            return None
        try:
            meta = json.loads(meta_p.read_text())
            if meta.get("key") != json.loads(json.dumps(key, default=str)):
                log.warning("feature cache: key mismatch in %s; recomputing", d)
                return None
            with safe_open(str(data_p), framework="pt") as f:
                if not set(names) <= set(f.keys()):
                    return None
                return {n: f.get_tensor(n) for n in names}
        except Exception as e:  # damaged entry: recompute rather than trust it
            log.warning("feature cache: cannot read %s (%s); recomputing", d, e)
            return None

    def save(self, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path | None:
        if not self.enabled:
            return None
        d = self._dir(key)
        try:
            with atomic_path(d, is_dir=True) as tmp:
                tmp.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "features.safetensors"))
                (tmp / "meta.json").write_text(
                    json.dumps(
                        {"key": key, "shapes": {k: list(v.shape) for k, v in tensors.items()}}, default=str, indent=1
                    )
                )
        except OSError as e:
            log.warning("feature cache: cannot write %s (%s)", d, e)
            return None
        return d
