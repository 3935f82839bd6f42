"""What decode-time reduction costs in accuracy: `decode(path, size=224)` against a full decode.

    python benchmarks/speed/decode_reduction.py

For every image under /usr/share/backgrounds/mate (the `mate-backgrounds` package the Makefile
installs): the effnet-minilm model input [3, 224, 224] in 0..1 (short side resized, centre crop)
from both decodes, its largest and mean absolute difference, and the cosine similarity of the two
image embeddings. Images too small to be reduced must come out identical. The numbers quoted in
`vlclassify.data.decoder`'s docstring come from this script.
"""

from __future__ import annotations

import glob

import numpy as np
import torch

from vlclassify.backbones import create_backbone
from vlclassify.backbones.base import pil_to_unit_array
from vlclassify.data import decode


def main() -> None:
    """Print one row per image and a summary of the reduced ones."""
    bb = create_backbone("effnet-minilm")
    reduced = []
    for p in sorted(glob.glob("/usr/share/backgrounds/mate/*/*")):
        full, small = decode(p), decode(p, size=224)
        diff = np.abs(pil_to_unit_array(full, 224) - pil_to_unit_array(small, 224))  # [3, 224, 224]
        with torch.no_grad():
            e = bb.encode_image(torch.stack([bb.preprocess(full), bb.preprocess(small)])).embeds  # [2, D]
        cos = torch.nn.functional.cosine_similarity(e[:1], e[1:]).item()
        name = p.rsplit("/", 1)[-1]
        print(
            f"{name:38s} {full.size} -> {small.size}: input max {diff.max():.4f} mean {diff.mean():.5f}, cos {cos:.6f}"
        )
        if full.size != small.size:
            reduced.append((diff.max(), diff.mean(), cos))
        else:
            assert diff.max() == 0, f"{name}: not reduced, yet the model input moved"
    if reduced:
        mx, mean, cos = (np.array(c) for c in zip(*reduced))
        print(f"reduced {len(reduced)}: input max {mx.max():.4f}, mean {mean.mean():.5f}, lowest cos {cos.min():.6f}")


if __name__ == "__main__":
    main()
