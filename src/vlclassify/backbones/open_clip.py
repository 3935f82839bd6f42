"""OpenCLIP models (optional extra `vlclassify[open-clip]`; `pretrained` may be a local file).

open_clip pulls in torchvision and timm, so it is imported only when this backbone is built.
`split()` supports the CLIP text tower and the ViT and ModifiedResNet image towers; older
open_clip versions run their transformers sequence-first, newer ones batch-first, so the split
finds the layout once (one blank image / text) and keeps trunk activations batch-first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError
from ..utils import file_fingerprint, json_fingerprint
from .base import Backbone, BackboneSplit, ImageFeatures, TextFeatures, copy_module, last_real
from .registry import register_backbone

POOLS = ("argmax", "eos", "first")  # text pooling the split reproduces (open_clip's text_pool_type)


class OpenCLIP(Backbone):
    """An open_clip model (optional dependency) with its own transform, for users of OpenCLIP checkpoints."""

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
        """Hash of the checkpoint file, or of the pretrained tag."""
        if self._pretrained and Path(self._pretrained).is_file():
            return file_fingerprint(self._pretrained, full=False)
        return json_fingerprint({"tag": self._pretrained})

    def preprocess_config(self) -> dict:
        """open_clip's transform, for the feature cache key."""
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

    def bridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact: this backbone's `pooled` features are the joint embedding itself (the identity)."""
        return torch.eye(self.embed_dim), torch.zeros(self.embed_dim)

    def _ends(self, ids: torch.Tensor) -> torch.Tensor:
        """[N] position of each row's last real token (the EOT token, where the model pools)."""
        pool = getattr(self.model, "text_pool_type", "argmax")
        if pool == "argmax":
            return ids.argmax(-1)
        if pool == "eos":
            return (ids == self.model.text_eos_id).int().argmax(-1)
        return (ids != 0).long().sum(1).clamp_min(1) - 1

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """input_ids [N, C] at the model's context length C (its positional embedding is that long);
        `max_tokens` truncates a longer text as open_clip does (its EOT token moves to the last slot)."""
        ids = self.tokenizer_fn(list(texts))
        end = self._ends(ids)
        if max_tokens is not None and max_tokens < ids.shape[1]:
            ids = ids.clone()
            for r in (end >= max_tokens).nonzero().flatten().tolist():
                ids[r, max_tokens - 1] = ids[r, end[r]]
                ids[r, max_tokens:] = 0
            end = end.clamp(max=max_tokens - 1)
        mask = torch.arange(ids.shape[1])[None] <= end[:, None]  # [N, C]
        return {"input_ids": ids, "attention_mask": mask}

    def token_strings(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        batch = self.tokenize(texts, max_tokens)
        decoder = getattr(self.tokenizer_fn, "decoder", {})  # SimpleTokenizer: id -> BPE string
        L = int(batch["attention_mask"].sum(1).max())
        return [
            [decoder.get(i, str(i)) if real else "" for i, real in zip(ids[:L], m[:L])]
            for ids, m in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
        ]

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        """Token features are read from `ln_final` with a hook (its output is [N, L, W] in every
        open_clip version, whatever the transformer's layout) and projected like the EOS token;
        they are cut after the longest text (the rest is padding no real token attends to)."""
        batch = self.tokenize(texts)
        seen: list[torch.Tensor] = []
        handle = self.model.ln_final.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            embeds = self.model.encode_text(batch["input_ids"])
        finally:
            handle.remove()
        L = int(batch["attention_mask"].sum(1).max())
        return TextFeatures(
            embeds=embeds,
            tokens=_project(seen[-1][:, :L], self.model.text_projection),
            mask=batch["attention_mask"][:, :L],
            token_strings=self.token_strings(texts),
        )

    def split(self, image_blocks: int | None = 0, text_layers: int | None = 0) -> OpenCLIPSplit:
        return OpenCLIPSplit(self, image_blocks, text_layers).eval()  # eval like the backbone; trainers set modes


def _project(x: torch.Tensor, proj: nn.Module | torch.Tensor | None) -> torch.Tensor:
    """open_clip projections are a Parameter (x @ proj) or an nn.Linear."""
    if proj is None:
        return x
    return x @ proj if isinstance(proj, torch.Tensor) else proj(x)


def _copy_proj(proj: nn.Module | torch.Tensor | None) -> nn.Module | torch.Tensor | None:
    if isinstance(proj, torch.Tensor):
        return nn.Parameter(proj.detach().clone())
    return None if proj is None else copy_module(proj)


class _Captured(Exception):
    """Stops a forward pass once the activations at the cut are captured."""


def _capture(module: nn.Module, run, before: bool) -> torch.Tensor:
    """The input (`before`) or output of `module` during `run()`; the rest of the pass is skipped."""
    box: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        box.append(x)
        raise _Captured

    if before:
        handle = module.register_forward_pre_hook(lambda _m, args: grab(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: grab(out))
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise ConfigError(f"open-clip split: the forward pass never reached {type(module).__name__}")
    return box[0]


class OpenCLIPSplit(BackboneSplit):
    """Image top (ViT): the last `image_blocks` resblocks + ln_post + proj; (ModifiedResNet): the
    last `image_blocks` layer4 bottlenecks + attnpool. Text top: the last `text_layers` resblocks
    (causal attention) + ln_final + EOT pooling + text_projection."""

    backbone: OpenCLIP
    tower: str  # "vit" | "resnet" | "" (another image tower)

    def __init__(self, backbone: OpenCLIP, image_blocks: int | None, text_layers: int | None) -> None:
        m, v = backbone.model, backbone.model.visual
        self.__dict__["tower"] = (
            "vit" if hasattr(v, "transformer") and hasattr(v, "ln_post") else "resnet" if hasattr(v, "attnpool") else ""
        )
        if not hasattr(m, "transformer") or not hasattr(m, "ln_final"):
            raise ConfigError(f"open-clip: split() needs a CLIP text tower; {type(m).__name__} has another one")
        n_img = {"vit": lambda: len(v.transformer.resblocks), "resnet": lambda: len(v.layer4)}.get(self.tower)
        super().__init__(backbone, image_blocks, text_layers, (n_img() if n_img else 0, len(m.transformer.resblocks)))
        if image_blocks is not None:
            if not self.tower:
                raise ConfigError(
                    f"open-clip: split() supports ViT and ModifiedResNet image towers, not {type(v).__name__}"
                )
            if getattr(v, "attn_pool", None) is not None:
                raise ConfigError("open-clip: split() does not support attentional pooling (CoCa) image towers")
            if self.tower == "vit":
                blocks = v.transformer.resblocks
                self.image_resblocks = nn.ModuleList(copy_module(b) for b in blocks[len(blocks) - image_blocks :])
                self.ln_post, self.proj = copy_module(v.ln_post), _copy_proj(v.proj)
                self.__dict__["image_nld"] = self._batch_first(
                    self._cut_image, torch.zeros(1, 3, backbone.image_size, backbone.image_size)
                )
            else:
                self.layer4 = nn.Sequential(*(copy_module(b) for b in v.layer4[len(v.layer4) - image_blocks :]))
                self.attnpool = copy_module(v.attnpool)
        if text_layers is not None:
            pool = getattr(m, "text_pool_type", "argmax")
            if pool not in POOLS:
                raise ConfigError(f"open-clip: split() reproduces text pooling {', '.join(POOLS)}, not {pool!r}")
            blocks = m.transformer.resblocks
            self.text_resblocks = nn.ModuleList(copy_module(b) for b in blocks[len(blocks) - text_layers :])
            self.ln_final, self.text_projection = copy_module(m.ln_final), _copy_proj(m.text_projection)
            self.__dict__["text_nld"] = self._batch_first(self._cut_text, backbone.tokenize(["a"])["input_ids"])

    @staticmethod
    def _batch_first(cut, probe: torch.Tensor) -> bool:
        """Whether the transformer runs [N, L, W] (probed on one input: [1, L, W] vs [L, 1, W])."""
        with torch.no_grad():
            return cut(probe).shape[0] == 1

    # ---- images ---------------------------------------------------------------------------
    def _cut_image(self, pixels: torch.Tensor) -> torch.Tensor:
        v, k = self.backbone.model.visual, self.image_blocks
        assert k is not None  # image_trunk checked it
        if self.tower == "vit":
            blocks = v.transformer.resblocks
            where, before = (blocks[len(blocks) - k], True) if k else (v.transformer, False)
        else:
            where, before = (v.layer4[len(v.layer4) - k], True) if k else (v.attnpool, True)
        return _capture(where, lambda: v(pixels), before)

    def _image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self._cut_image(pixels)
        return x if self.tower == "resnet" or self.image_nld else x.transpose(0, 1)  # [N, S, W] or [N, C, h, w]

    def _image_top(self, acts: torch.Tensor) -> ImageFeatures:
        if self.tower == "resnet":
            embeds = self.attnpool(self.layer4(acts))  # [N, D]
            return ImageFeatures(embeds=embeds, tokens=embeds[:, None], pooled=embeds, grid=(1, 1))
        v = self.backbone.model.visual
        x = acts if self.image_nld else acts.transpose(0, 1)
        for block in self.image_resblocks:
            x = block(x)
        x = x if self.image_nld else x.transpose(0, 1)  # [N, S, W]
        if getattr(v, "final_ln_after_pool", False):
            pooled, tokens = v._global_pool(x)
            pooled = self.ln_post(pooled)
        else:
            pooled, tokens = v._global_pool(self.ln_post(x))
        embeds = _project(pooled, self.proj)  # [N, D]
        if self.proj is not None and tokens.shape[-1] != embeds.shape[-1]:
            tokens = _project(tokens, self.proj)  # [N, P, D], as encode_image
        p = tokens.shape[1]
        g = int(round(p**0.5))
        return ImageFeatures(embeds=embeds, tokens=tokens, pooled=embeds, grid=(g, g) if g * g == p else (1, p))

    # ---- texts ----------------------------------------------------------------------------
    def _cut_text(self, ids: torch.Tensor) -> torch.Tensor:
        m, k = self.backbone.model, self.text_layers
        assert k is not None  # text_trunk checked it
        blocks = m.transformer.resblocks
        where, before = (blocks[len(blocks) - k], True) if k else (m.transformer, False)
        return _capture(where, lambda: m.encode_text(ids), before)

    def _text_trunk(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._cut_text(batch["input_ids"])
        x = x if self.text_nld else x.transpose(0, 1)  # [N, C, W]
        L = int(batch["attention_mask"].sum(1).max())
        return x[:, :L], batch["attention_mask"][:, :L]  # later positions are padding no real token sees

    def _text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        m, L = self.backbone.model, hidden.shape[1]
        causal = m.attn_mask[:L, :L] if m.attn_mask is not None else None
        x = hidden if self.text_nld else hidden.transpose(0, 1)
        for block in self.text_resblocks:
            x = block(x, attn_mask=causal)
        x = self.ln_final(x if self.text_nld else x.transpose(0, 1))  # [N, L, W]
        pooled = x[:, 0] if getattr(m, "text_pool_type", "argmax") == "first" else last_real(x, mask)
        return TextFeatures(
            embeds=_project(pooled, self.text_projection), tokens=_project(x, self.text_projection), mask=mask
        )


@register_backbone("open-clip", "OpenCLIP model (optional extra); pretrained may be a local file")
def open_clip_backbone(**options) -> OpenCLIP:
    """Registry factory of the `open-clip` backbone."""
    return OpenCLIP(**options)
