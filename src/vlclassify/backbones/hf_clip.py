"""Hugging Face `CLIPModel` from a local folder (or a hub id, which needs network access).

Images are preprocessed exactly as transformers' `CLIPImageProcessor` (its PIL implementation)
does with the folder's `preprocessor_config.json` (defaults: CLIP's): bicubic resize of the short
side to `shortest_edge` with the long side *truncated* (`int(size * long / short)`), centre crop
with the offset rounded down (OpenAI's CenterCrop rounds it), x / 255 in float64 cast to float32,
then (x - mean) / std: bit for bit the same pixels on real images (max abs difference 0.0,
tests/test_hf_clip_preprocess.py). Transparency: vlclassify composites
transparent pixels onto white when it decodes (data/decoder.py), as transformers' `convert_to_rgb`
does (the installed transformers 5; OpenAI's CLIP and older transformers releases call
`convert("RGB")`, which drops the alpha channel and keeps whatever colour transparent pixels hold).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError
from ..utils import file_fingerprint, json_fingerprint
from .base import (
    Backbone,
    BackboneSplit,
    ImageFeatures,
    TextFeatures,
    copy_module,
    first_output,
    hf_token_strings,
    last_real,
    quiet_from_pretrained,
)
from .registry import register_backbone

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(
    image: Image.Image,
    resize: int | tuple[int, int],
    crop: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """RGB PIL image -> [3, crop_h, crop_w] float32, as `CLIPImageProcessor` computes it.

    `resize`: the short side's length (aspect kept, long side truncated) or an exact (h, w)."""
    w, h = image.size
    if isinstance(resize, int):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(resize * long / short)
        nw, nh = (resize, new_long) if w <= h else (new_long, resize)
    else:
        nh, nw = resize
    image = image.resize((nw, nh), resample)
    ch, cw = crop
    top, left = (nh - ch) // 2, (nw - cw) // 2
    arr = np.asarray(image, dtype=np.uint8)[top : top + ch, left : left + cw]  # [h, w, 3]
    x: np.ndarray = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)  # [h, w, 3]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _preprocessor_settings(cfg: dict, image_size: int, where: str) -> dict:
    """resize / crop / resample / mean / std from a `preprocessor_config.json` (CLIP's defaults)."""
    size = cfg.get("size", {"shortest_edge": image_size})
    if isinstance(size, int):
        resize: int | tuple[int, int] = size
    elif size.get("shortest_edge"):
        resize = int(size["shortest_edge"])
    elif size.get("height") and size.get("width"):
        resize = (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"{where}: unsupported 'size' {size!r} (use shortest_edge or height/width)")
    if not cfg.get("do_center_crop", True):
        if not isinstance(resize, tuple):
            raise ConfigError(f"{where}: do_center_crop false needs a square height/width 'size'")
        crop = resize
    else:
        c = cfg.get("crop_size", image_size)
        crop = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
    if crop != (image_size, image_size):
        raise ConfigError(f"{where}: images would be {crop} pixels but the model takes {image_size}x{image_size}")
    if isinstance(resize, int) and resize < image_size:
        raise ConfigError(f"{where}: shortest_edge {resize} is smaller than the {image_size}-pixel crop")
    return {
        "resize": resize,
        "crop": crop,
        "resample": int(cfg.get("resample", Image.Resampling.BICUBIC)),
        "mean": tuple(cfg.get("image_mean", CLIP_MEAN)),
        "std": tuple(cfg.get("image_std", CLIP_STD)),
    }


def weight_files_fingerprint(folder: Path) -> str:
    """Fingerprint of the weight files in a folder (size + first/last MiB: fast on GB-sized files)."""
    files = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    if not files:
        return "no-weight-files"
    return json_fingerprint([(p.name, file_fingerprint(p, full=False)) for p in files])


class HFCLIP(Backbone):
    """A Hugging Face `CLIPModel` from a local folder (or the hub when allowed): the real CLIP weights when a user
    has them."""

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
        pp = self._folder / "preprocessor_config.json" if self._folder is not None else None
        cfg = json.loads(pp.read_text()) if pp is not None and pp.exists() else {}
        self.pixels = _preprocessor_settings(cfg, self.image_size, str(pp or path))

    def weights_fingerprint(self) -> str:
        """Hash of the weight files (or of a few parameters for a model without a folder)."""
        if self._folder is None:
            return json_fingerprint({n: float(p.double().sum()) for n, p in list(self.model.named_parameters())[:8]})
        return weight_files_fingerprint(self._folder)

    def preprocess_config(self) -> dict:
        """CLIPImageProcessor's settings, for the feature cache key."""
        return {"recipe": "CLIPImageProcessor", **self.pixels}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(clip_pixels(image, **self.pixels))

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        vm = self.model.vision_model
        out = vm(pixel_values=pixels)
        pooled = out.pooler_output  # [N, Dv] post-layernorm CLS
        patches = vm.post_layernorm(out.last_hidden_state[:, 1:])  # [N, P, Dv]
        proj = self.model.visual_projection
        g = self.patch_grid
        return ImageFeatures(embeds=proj(pooled), tokens=proj(patches), pooled=pooled, grid=(g, g))

    def bridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact: `pooled` is the post-layernorm CLS token and `embeds` its visual projection (no bias)."""
        w = self.model.visual_projection.weight.detach().float().clone()  # [D, Dv]
        return w, torch.zeros(w.shape[0])

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        n = self.max_length if max_tokens is None else min(max_tokens, self.max_length)
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=n, return_tensors="pt")

    def token_strings(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        return hf_token_strings(self.tokenizer, self.tokenize(texts, max_tokens))

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        """texts -> CLIP text features: the EOS token's projection and every token's."""
        batch = self.tokenize(texts)
        out = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        proj = self.model.text_projection
        return TextFeatures(
            embeds=proj(out.pooler_output),  # [N, D] from the EOS token, as CLIP
            tokens=proj(out.last_hidden_state),  # [N, L, D]
            mask=batch["attention_mask"].bool(),
            token_strings=self.token_strings(texts),
        )

    def split(self, image_blocks: int | None = 0, text_layers: int | None = 0) -> HFCLIPSplit:
        return HFCLIPSplit(self, image_blocks, text_layers).eval()  # eval like the backbone; trainers set modes


class HFCLIPSplit(BackboneSplit):
    """Image top: the last `image_blocks` vision encoder layers + post_layernorm + visual_projection.
    Text top: the last `text_layers` text encoder layers (causal attention) + final_layer_norm +
    EOS pooling + text_projection."""

    backbone: HFCLIP

    def __init__(self, backbone: HFCLIP, image_blocks: int | None, text_layers: int | None) -> None:
        m = backbone.model
        vl, tl = m.vision_model.encoder.layers, m.text_model.encoder.layers
        super().__init__(backbone, image_blocks, text_layers, (len(vl), len(tl)))
        if image_blocks is not None:
            self.vision_layers = nn.ModuleList(copy_module(x) for x in vl[len(vl) - image_blocks :])
            self.post_layernorm = copy_module(m.vision_model.post_layernorm)
            self.visual_projection = copy_module(m.visual_projection)
        if text_layers is not None:
            self.language_layers = nn.ModuleList(copy_module(x) for x in tl[len(tl) - text_layers :])
            self.final_layer_norm = copy_module(m.text_model.final_layer_norm)
            self.text_projection = copy_module(m.text_projection)

    def _image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self.image_blocks is not None  # image_trunk checked it
        vm = self.backbone.model.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))  # [N, 1 + P, W]
        for layer in vm.encoder.layers[: len(vm.encoder.layers) - self.image_blocks]:
            x = _layer(layer, x, None)
        return x

    def _image_top(self, acts: torch.Tensor) -> ImageFeatures:
        x = acts
        for layer in self.vision_layers:
            x = _layer(layer, x, None)
        pooled = self.post_layernorm(x[:, 0])  # [N, W] the CLS token
        patches = self.post_layernorm(x[:, 1:])  # [N, P, W]
        g = self.backbone.patch_grid
        return ImageFeatures(
            embeds=self.visual_projection(pooled), tokens=self.visual_projection(patches), pooled=pooled, grid=(g, g)
        )

    def _text_trunk(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.text_layers is not None  # text_trunk checked it
        tm = self.backbone.model.text_model
        mask = batch["attention_mask"].bool()
        x = tm.embeddings(input_ids=batch["input_ids"])  # [N, L, W] with positions
        for layer in tm.encoder.layers[: len(tm.encoder.layers) - self.text_layers]:
            x = _layer(layer, x, _causal(mask, x.dtype))
        return x, mask

    def _text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        x = hidden
        for layer in self.language_layers:
            x = _layer(layer, x, _causal(mask, x.dtype))
        x = self.final_layer_norm(x)
        return TextFeatures(embeds=self.text_projection(last_real(x, mask)), tokens=self.text_projection(x), mask=mask)


def _causal(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L] bool (real tokens) -> [N, 1, L, L] additive mask: causal, padding keys masked."""
    L = mask.shape[1]
    keep = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()[None] & mask[:, None, :]  # [N, L, L]
    out = torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)
    return out[:, None]


def _layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One CLIPEncoderLayer: transformers 5 takes (hidden, mask); 4 also a separate causal mask."""
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:
        return first_output(layer(x, mask, None))
    return first_output(layer(x, mask))


@register_backbone("hf-clip", "Hugging Face CLIPModel from a local folder (path=...) or hub id")
def hf_clip(path: str | None = None, **options) -> HFCLIP:
    """Registry factory of the `hf-clip` backbone; `path` is required."""
    if not path:
        raise ConfigError("hf-clip needs path=<folder with a CLIPModel saved by save_pretrained, or a hub id>")
    return HFCLIP(path, **options)
