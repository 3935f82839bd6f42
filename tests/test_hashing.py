import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlclassify.data import Item
from vlclassify.data.source import BytesSource, MemberSource
from vlclassify.errors import DataError


def test_same_content_same_hash_whatever_the_path(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(255 - arr).save(tmp_path / "c.png")
    h = [Item(image=str(tmp_path / n)).image.hash() for n in ("a.png", "b.png", "c.png")]
    assert h[0] == h[1] != h[2]
    assert Item(image=arr).image.hash() == Item(image=arr.copy()).image.hash() != Item(image=arr[::-1]).image.hash()
    assert Item(image=None, text="only text").image is None
    with pytest.raises(DataError, match="nope.png: image file not found"):
        Item(image=str(tmp_path / "nope.png")).image.hash()


def test_a_tar_member_and_uploaded_bytes_hash_like_the_file(tmp_path):
    """The feature store's key does not depend on where the bytes sit: file, tar member, upload."""
    Image.fromarray(np.full((6, 6, 3), 40, np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        info = tarfile.TarInfo("k.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "s.tar") as tf:
        m = tf.getmember("k.png")
        member = MemberSource(str(tmp_path / "s.tar"), "k.png", m.offset_data, m.size)
    file_hash = Item(image=tmp_path / "a.png").image.hash()  # a PathLike becomes a file source too
    assert member.hash() == BytesSource(data, "upload").hash() == file_hash
    assert member.describe() == f"{tmp_path / 's.tar'}:k.png" and member.suffix == "png"
