import numpy as np
import pytest
from PIL import Image

from vlclassify.data import Item
from vlclassify.data.hashing import content_hash
from vlclassify.errors import DataError


def test_same_content_same_hash_whatever_the_path(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(255 - arr).save(tmp_path / "c.png")
    h = [content_hash(Item(image=str(tmp_path / n))) for n in ("a.png", "b.png", "c.png")]
    assert h[0] == h[1] != h[2]
    assert content_hash(Item(image=arr)) == content_hash(Item(image=arr.copy())) != content_hash(Item(image=arr.T))
    assert content_hash(Item(image=None, text="only text")) is None
    with pytest.raises(DataError, match="nope.png: image file not found"):
        content_hash(Item(image=str(tmp_path / "nope.png")))
