"""Hugging Face `CLIPModel` from a local folder (or a hub id, which needs network access)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from PIL import Image

from ..errors import ConfigError
from ..utils import file_fingerprint, json_fingerprint
from .base import Backbone, ImageFeatures, TextFeatures, pil_to_unit_tensor, quiet_from_pretrained
from .registry import register_backbone

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def weight_files_fingerprint(folder: Path) -> str:
    """Fingerprint of the weight files in a folder (size + first/last MiB: fast on GB-sized files)."""
    files = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    if not files:
        return "no-weight-files"
    return json_fingerprint([(p.name, file_fingerprint(p, full=False)) for p in files])


class HFCLIP(Backbone):
    name = "hf-clip"

    def __init__(self, path: str, logit_scale: float | None = None, local_files_only: bool = False) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = quiet_from_pretrained(CLIPModel, path, local_files_only=local_files_only)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            hint = "" if Path(path).exists() else " (not a local folder; a hub id needs network access)"
            raise ConfigError(f"hf-clip: cannot load {path!r}{hint}: {str(e).splitlines()[0]}") from None
        self.model.eval()
        self._folder = Path(self.model.name_or_path) if Path(self.model.name_or_path).exists() else None
        scale = float(self.model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale)
        self.options = {"path": str(path), "logit_scale": scale}
        vc = self.model.config.vision_config
        self.image_size = int(vc.image_size)
        self.embed_dim = int(self.model.config.projection_dim)
        self.pooled_dim = int(vc.hidden_size)
        self.patch_grid = self.image_size // int(vc.patch_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        if self._folder is not None and (self._folder / "preprocessor_config.json").exists():
            cfg = json.loads((self._folder / "preprocessor_config.json").read_text())
            self.mean = tuple(cfg.get("image_mean", CLIP_MEAN))
            self.std = tuple(cfg.get("image_std", CLIP_STD))

    def weights_fingerprint(self) -> str:
        if self._folder is None:
            return json_fingerprint({n: float(p.double().sum()) for n, p in list(self.model.named_parameters())[:8]})
        return weight_files_fingerprint(self._folder)

    def preprocess_config(self) -> dict:
        return {
            "resize": "short-side bicubic + centre crop",
            "size": self.image_size,
            "mean": self.mean,
            "std": self.std,
        }

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        x = pil_to_unit_tensor(image, self.image_size)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        vm = self.model.vision_model
        out = vm(pixel_values=pixels)
        pooled = out.pooler_output  # [N, Dv] post-layernorm CLS
        patches = vm.post_layernorm(out.last_hidden_state[:, 1:])  # [N, P, Dv]
        proj = self.model.visual_projection
        g = self.patch_grid
        return ImageFeatures(embeds=proj(pooled), tokens=proj(patches), pooled=pooled, grid=(g, g))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        batch = self.tokenize(texts)
        out = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        proj = self.model.text_projection
        strings = [cast(list[str], self.tokenizer.convert_ids_to_tokens(ids)) for ids in batch["input_ids"].tolist()]
        return TextFeatures(
            embeds=proj(out.pooler_output),  # [N, D] from the EOS token, as CLIP
            tokens=proj(out.last_hidden_state),  # [N, L, D]
            mask=batch["attention_mask"].bool(),
            token_strings=strings,
        )


@register_backbone("hf-clip", "Hugging Face CLIPModel from a local folder (path=...) or hub id")
def hf_clip(path: str | None = None, **options) -> HFCLIP:
    if not path:
        raise ConfigError("hf-clip needs path=<folder with a CLIPModel saved by save_pretrained, or a hub id>")
    return HFCLIP(path, **options)
