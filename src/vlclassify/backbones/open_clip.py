"""OpenCLIP models (optional extra `vlclassify[open-clip]`; `pretrained` may be a local file).

open_clip pulls in torchvision and timm, so it is imported only when this backbone is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..errors import ConfigError
from ..utils import file_fingerprint, json_fingerprint
from .base import Backbone, ImageFeatures, TextFeatures
from .registry import register_backbone


class OpenCLIP(Backbone):
    name = "open-clip"

    def __init__(
        self, model: str = "ViT-B-32", pretrained: str | None = None, logit_scale: float | None = None
    ) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ConfigError(
                "open-clip backbone needs the optional extra: pip install 'vlclassify[open-clip]'"
            ) from None
        try:
            self.model, _, self.transform = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        except Exception as e:  # open_clip raises RuntimeError/OSError for unknown tags and missing files
            raise ConfigError(f"open-clip: cannot build {model!r} with pretrained={pretrained!r}: {e}") from None
        self.model.eval()
        self.tokenizer_fn = open_clip.get_tokenizer(model)
        self._pretrained = pretrained
        scale = float(self.model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale)
        self.options = {"model": model, "pretrained": pretrained, "logit_scale": scale}
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = (
            int(self.model.text_projection.shape[1])
            if isinstance(self.model.text_projection, torch.Tensor)
            else int(self.model.text_projection.out_features)
        )
        self.pooled_dim = self.embed_dim
        if hasattr(visual, "output_tokens"):
            visual.output_tokens = True  # ViT: return (pooled, tokens)

    def weights_fingerprint(self) -> str:
        if self._pretrained and Path(self._pretrained).is_file():
            return file_fingerprint(self._pretrained, full=False)
        return json_fingerprint({"tag": self._pretrained})

    def preprocess_config(self) -> dict:
        return {"transform": repr(self.transform)}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        out = self.model.visual(pixels)
        if isinstance(out, tuple):  # ViT with output_tokens: (pooled [N, D], tokens [N, P, W] after ln_post)
            embeds, tokens = out
            proj = getattr(self.model.visual, "proj", None)
            if proj is not None and tokens.shape[-1] != embeds.shape[-1]:
                tokens = tokens @ proj  # [N, P, D], the projection the pooled token went through
        else:  # ModifiedResNet and others expose no tokens: the global embedding is the one token
            embeds, tokens = out, out.unsqueeze(1)
        p = tokens.shape[1]
        g = int(round(p**0.5))
        grid = (g, g) if g * g == p else (1, p)
        return ImageFeatures(embeds=embeds, tokens=tokens, pooled=embeds, grid=grid)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer_fn(list(texts))
        return {"input_ids": ids, "attention_mask": ids != 0}

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        """Token features are read from `ln_final` with a hook (its output is [N, L, W] in every
        open_clip version, whatever the transformer's layout) and projected like the EOS token."""
        batch = self.tokenize(texts)
        seen: list[torch.Tensor] = []
        handle = self.model.ln_final.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            embeds = self.model.encode_text(batch["input_ids"])
        finally:
            handle.remove()
        proj = self.model.text_projection
        tokens = seen[-1] @ proj if isinstance(proj, torch.Tensor) else proj(seen[-1])
        return TextFeatures(
            embeds=embeds,
            tokens=tokens,
            mask=batch["attention_mask"].bool(),
            token_strings=[[str(t) for t in row] for row in batch["input_ids"].tolist()],
        )


@register_backbone("open-clip", "OpenCLIP model (optional extra); pretrained may be a local file")
def open_clip_backbone(**options) -> OpenCLIP:
    return OpenCLIP(**options)
