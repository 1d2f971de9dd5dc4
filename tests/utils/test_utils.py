"""mosaic_kit.utils: the shared input checks, atomic writes and image conversion."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mosaic_kit.utils import (
    TEMPORARY_PREFIX,
    atomic_write,
    check_images,
    check_int,
    check_real,
    check_size,
    pil_to_tensor,
    save_image_atomic,
    tensor_to_pil,
    to_uint8,
    write_text_atomic,
)


# ----------------------------------------------------------------------------- checks
def test_check_int_accepts_integers_of_every_kind_and_names_the_argument():
    assert check_int("n", 3) == 3 and check_int("n", np.int64(4)) == 4 and check_int("n", torch.tensor(5)) == 5
    for bad in (True, 2.0, "3", torch.tensor(1.0), torch.tensor([1]), torch.tensor(True), None):
        with pytest.raises(ValueError, match="Expected `n` to be an integer"):
            check_int("n", bad)
    with pytest.raises(ValueError, match=r"Expected `n` >= 1, but got 0"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match=r"Expected `n` <= 6, but got 7"):
        check_int("n", 7, maximum=6)


def test_check_real_and_size():
    assert check_real("x", 1, 0.0, 1.0) == 1.0
    for bad in (float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="Expected `x` to be a finite number"):
            check_real("x", bad, 0.0, 1.0)
    assert check_size("size", np.int32(8)) == (8, 8)
    with pytest.raises(ValueError, match=r"Expected `size\[1\]` >= 1"):
        check_size("size", (4, 0))


def test_check_images_names_range_dtype_and_shape():
    ok = torch.rand(2, 3, 4, 4)
    assert check_images(ok) is ok
    with pytest.raises(ValueError, match=r"Expected `refs` of shape \(B, 3, H, W\), but got \(2, 4, 4, 4\)"):
        check_images(torch.rand(2, 4, 4, 4), "refs")
    with pytest.raises(ValueError, match="floating dtype"):
        check_images(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="values in"):
        check_images(torch.full((1, 3, 2, 2), float("nan")))


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "a" / "b.txt"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(b"old")
    seen = []

    def write(stream):
        stream.write(b"half")
        seen.extend(p.name for p in tmp_path.iterdir() if p.name != "b.bin")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert seen[0].startswith(TEMPORARY_PREFIX + "b.bin.") and seen[0].endswith(".tmp")  # beside the destination
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]


def test_save_image_atomic_takes_the_format_from_the_suffix(tmp_path):
    image = Image.new("RGB", (5, 3), (10, 20, 30))
    for name in ("x.png", "x.JPG", "x.webp"):
        with Image.open(save_image_atomic(image, tmp_path / name)) as read:
            assert read.size == (5, 3)
    with pytest.raises(ValueError, match="`path` with an image suffix"):
        save_image_atomic(image, tmp_path / "x.unknown")
    assert not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------- image conversion
def _numpy_to_pil(image: torch.Tensor) -> Image.Image:
    """The converters this module replaced (trainer, pipeline, recipes) wrote it this way."""
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_tensor_to_pil_matches_the_numpy_twin_and_round_trips(height, width, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 1.2 - 0.1  # some values outside [0, 1]
    ours = tensor_to_pil(image)
    assert ours.mode == "RGB" and ours.size == (width, height)
    assert ours.tobytes() == _numpy_to_pil(image).tobytes()
    # uint8 → PIL → float → uint8 is exact
    codes = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    back = pil_to_tensor(tensor_to_pil(codes))
    assert torch.equal(to_uint8(back), codes)
    assert torch.equal(back, codes.float() / 255)


def test_grey_and_mask_images():
    mask = torch.tensor([[True, False], [False, True]])
    grey = tensor_to_pil(mask)
    assert grey.mode == "L" and grey.tobytes() == bytes([255, 0, 0, 255])
    assert torch.equal(pil_to_tensor(grey), mask.float())
    with pytest.raises(ValueError, match=r"Expected `image` of shape \(3, H, W\) or \(H, W\), but got \(1, 2, 2\)"):
        tensor_to_pil(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="PIL mode 'RGB' or 'L', but got 'RGBA'"):
        pil_to_tensor(Image.new("RGBA", (2, 2)))
