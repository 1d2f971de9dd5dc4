import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.correspondence import TokenGrid

sizes = st.integers(1, 12).map(lambda n: 16 * n)


@given(height=sizes, width=sizes)
def test_token_rowcol_pixel_latent_roundtrips_are_bijective(height, width):
    grid = TokenGrid(height, width)
    index = torch.arange(grid.num_tokens)
    rowcol = grid.token_to_rowcol(index)
    assert torch.equal(grid.rowcol_to_token(rowcol), index)
    assert len({tuple(rc) for rc in rowcol.tolist()}) == grid.num_tokens
    assert torch.equal(grid.pixel_to_token(grid.token_to_pixel(index)), index)
    assert torch.equal(grid.latent_to_token(grid.token_to_latent(index)), index)
    cells = torch.stack(torch.meshgrid(torch.arange(grid.latent_width), torch.arange(grid.latent_height), indexing="xy"), -1)
    assert torch.equal(grid.pixel_to_latent(grid.latent_to_pixel(cells)), cells)


@given(height=sizes, width=sizes, data=st.data())
def test_every_pixel_lands_in_the_token_that_contains_it(height, width, data):
    grid = TokenGrid(height, width)
    x = data.draw(st.floats(0, width, exclude_max=True))
    y = data.draw(st.floats(0, height, exclude_max=True))
    token = int(grid.pixel_to_token(torch.tensor([x, y], dtype=torch.float64)))
    row, col = grid.token_to_rowcol(torch.tensor(token)).tolist()
    assert col * 16 <= x < (col + 1) * 16 and row * 16 <= y < (row + 1) * 16


def test_row_major_layout_and_other_frames():
    grid = TokenGrid(32, 64)  # 2 × 4 tokens
    assert (grid.rows, grid.cols, grid.latent_height, grid.latent_width) == (2, 4, 4, 8)
    assert grid.rowcol_to_token(torch.tensor([1, 2])) == 6
    # A 64×64 feature grid mapped to the 32×64 image: (x=63, y=63) is the bottom-right token.
    assert grid.pixel_to_token(torch.tensor([63.0, 63.0]), image_size=(64, 64)) == 7
    assert grid.latent_to_token(torch.tensor([7, 3])) == 7
    assert torch.equal(grid.token_to_latent(torch.tensor(5)), torch.tensor([2, 2]))
    assert TokenGrid(64, 64, vae_scale_factor=4, patch_size=1).num_tokens == 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=500, width=512), "`height` to be a multiple of"),
        (dict(height=512, width=0), "`width` >= 1"),
        (dict(height=512.0, width=512), "`height` to be an integer"),
        (dict(height=512, width=512, patch_size=True), "`patch_size` to be an integer"),
    ],
)
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenGrid(**kwargs)


def test_bad_points_raise():
    grid = TokenGrid(32, 32)
    with pytest.raises(ValueError, match=r"`image_size` to be a pair of integers, but got 64"):
        grid.pixel_to_token(torch.tensor([[1.0, 1.0]]), image_size=64)
    with pytest.raises(ValueError, match=r"`xy` inside the image"):
        grid.pixel_to_latent(torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"`xy` inside the image of size \(H, W\) = \(32, 32\)"):
        grid.pixel_to_token(torch.tensor([[32.0, 0.0]]))
    with pytest.raises(ValueError, match=r"`xy` of shape \(\.\.\., 2\)"):
        grid.pixel_to_token(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"`index` in \[0, 4\)"):
        grid.token_to_rowcol(torch.tensor([4]))
    with pytest.raises(ValueError, match="integers"):
        grid.token_to_rowcol(torch.tensor([1.0]))
