"""The unified contrastive loss of iCAR (Eq. 6), one InfoNCE for classification and image-text data.

For every image i the loss is -log softmax_j(cos(f_t(T_j), v_i) / tau)[pos_i] over a text set T:
- classification data: T = all class sentences, pos_i = the image's class (Eq. 5);
- image-text pairs: T = the captions in the batch, pos_i = its own caption (Eq. 2).
Both kinds are scored against their own text set and averaged over all images of the batch,
which is Eq. 6 with D the union of the two datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    images: torch.Tensor,
    texts: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor | float,
    reduction: str = "mean",
) -> torch.Tensor:
    """images [N, D], texts [T, D], targets [N] (index into texts) -> loss (scalar or [N]).

    Cosine similarity times `scale` (= 1 / tau), cross-entropy against the positive text.
    """
    if texts.shape[0] < 2:
        raise ValueError(
            f"contrastive loss needs at least 2 texts to contrast, got {texts.shape[0]} "
            "(a batch with a single class or a single caption teaches nothing)"
        )
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"contrastive loss: {images.shape[0]} images but {targets.shape[0]} targets")
    logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # [N, T]
    return F.cross_entropy(logits, targets, reduction=reduction)


def unified_contrastive_loss(
    scale: torch.Tensor | float,
    cls_images: torch.Tensor | None = None,
    class_texts: torch.Tensor | None = None,
    cls_targets: torch.Tensor | None = None,
    pair_images: torch.Tensor | None = None,
    pair_texts: torch.Tensor | None = None,
    pair_targets: torch.Tensor | None = None,
    cls_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 6 over a mixed batch and its parts: {"loss": the mean per-image loss over both parts,
    "loss_cls": the classification images' mean, "loss_pair": the pairs' mean} (a part only if given).

    cls_images [Nc, D] vs class_texts [C, D] with cls_targets [Nc] in 0..C-1;
    pair_images [Np, D] vs pair_texts [U, D] (the batch's distinct captions) with pair_targets [Np].
    cls_logits [Nc, C]: a parametric classifier's logits scored by cross-entropy instead of the
    InfoNCE against class_texts (the "split heads" ablation: only the pairs train the text encoder).
    """
    per_image, out = [], {}
    if cls_logits is not None and cls_logits.shape[0]:
        lc = F.cross_entropy(cls_logits, _given(cls_targets, "cls_targets"), reduction="none")  # [Nc]
    elif cls_images is not None and cls_images.shape[0]:
        texts, targets = _given(class_texts, "class_texts"), _given(cls_targets, "cls_targets")
        lc = info_nce(cls_images, texts, targets, scale, reduction="none")  # [Nc]
    else:
        lc = None
    if lc is not None:
        per_image.append(lc)
        out["loss_cls"] = lc.mean()
    if pair_images is not None and pair_images.shape[0]:
        texts, targets = _given(pair_texts, "pair_texts"), _given(pair_targets, "pair_targets")
        lp = info_nce(pair_images, texts, targets, scale, reduction="none")  # [Np]
        per_image.append(lp)
        out["loss_pair"] = lp.mean()
    if not per_image:
        raise ValueError("unified contrastive loss: the batch holds neither classification images nor pairs")
    out["loss"] = torch.cat(per_image).mean()
    return out


def _given(x: torch.Tensor | None, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"unified contrastive loss: {name} is needed with the part it scores")
    return x
