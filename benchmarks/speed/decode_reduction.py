"""What decode-time reduction costs in accuracy and saves in memory: `decode(.., size=224)` against a full decode.

    python benchmarks/speed/decode_reduction.py            # accuracy on the mate backgrounds
    python benchmarks/speed/decode_reduction.py --memory   # peak memory of one 6300 x 6300 PNG

For every image under /usr/share/backgrounds/mate (the `mate-backgrounds` package the Makefile
installs): the effnet-minilm model input [3, 224, 224] in 0..1 (short side resized, centre crop)
from both decodes, its largest and mean absolute difference, and the cosine similarity of the two
image embeddings. Images too small to be reduced must come out identical. `--memory` decodes a
6300 x 6300 PNG (131 KB) from bytes at size 224, as the service decodes an upload, in a fresh
process, and prints its peak resident memory (VmHWM) above the peak before decoding. The numbers
quoted in `vlclassify.data.decoder`'s docstring come from this script.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

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


MEMORY_CHILD = """
import sys
import numpy as np
from vlclassify.data import decode
from vlclassify.data.source import BytesSource


def peak_mb():  # this process's own peak resident memory (ru_maxrss would include its parent's, kept over exec)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


data = open(sys.argv[1], "rb").read()
before = peak_mb()
a = np.asarray(decode(BytesSource(data, "big.png"), size=224))  # as the service decodes an upload
held = f"held {a.shape} ({a.nbytes / 1e6:.1f} MB)"
print(f"{len(data) / 1e3:.0f} KB PNG 6300 x 6300: {held}, peak +{peak_mb() - before:.0f} MB")
"""


def memory() -> None:
    """Peak memory of decoding one 6300 x 6300 PNG for the service, in a fresh process."""
    y, x = np.mgrid[0:6300, 0:6300]
    arr = np.stack([(x * 7) % 256, (y * 3) % 256, ((x + y) * 5) % 256], -1).astype(np.uint8)  # [6300, 6300, 3]
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/big.png"
        Image.fromarray(arr).save(path)
        del arr, x, y
        subprocess.run([sys.executable, "-c", MEMORY_CHILD, path], check=True)


if __name__ == "__main__":
    memory() if "--memory" in sys.argv[1:] else main()
