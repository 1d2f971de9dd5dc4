"""Dense SIFT descriptors: a weight-free extractor built on kornia."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.feature import SIFTDescriptor

from ..utils.checks import check_int, shape_str
from .base import FeatureExtractor

__all__ = ["DenseSIFT"]


def _patch_starts(size: int, cells: int, patch_size: int) -> torch.Tensor:
    """First pixel of the patch centred on each cell, `(cells,)` int64 (may be negative).

    Cell `i` is centred at `c = (i + 0.5) * size / cells` in continuous coordinates (pixel `k`
    spans `[k, k + 1)`); the patch takes the `patch_size` pixels whose centres lie closest around
    `c`, starting at `floor(c - patch_size / 2 + 0.5)`, computed in integers.
    """
    index = torch.arange(cells, dtype=torch.int64)
    return torch.div((2 * index + 1) * size - patch_size * cells + cells, 2 * cells, rounding_mode="floor")


class DenseSIFT(FeatureExtractor):
    """SIFT descriptors of a grayscale patch centred on every grid cell (no weights, no download).

    Each image is converted to grayscale, reflect-padded by what the border patches need, and cut
    into one `patch_size × patch_size` patch per grid cell, centred on the cell's centre (to the
    nearest pixel); `kornia.feature.SIFTDescriptor` describes each patch. Patches are described
    `chunk_size` at a time, so memory stays bounded whatever the image and grid size. The features
    are exactly on the grid (no resize). Descriptors are L2-normalised (RootSIFT by default), so
    cosine similarity is their dot product.

    With integer cell sizes (H divisible by gh, W by gw) the patches sit exactly on the cell
    centres: shifting an image by one cell's pixels shifts the descriptors by one cell, away from
    the borders.

    Args:
        grid_size: cells of the output grid, an int or `(gh, gw)`; defaults to 64.
        patch_size: side of each patch in pixels; defaults to 32.
        num_ang_bins: orientation bins of the descriptor; defaults to 8.
        num_spatial_bins: spatial bins per side of the descriptor; defaults to 4.
        rootsift: RootSIFT (Arandjelović & Zisserman, 2012) instead of plain SIFT; defaults to True.
        chunk_size: patches described at once; defaults to 256 (some tens of MB of float32 temporaries).

    Shape:
        - Input: `(B, 3, H, W)` float in [0, 1], with `H, W > patch_size / 2` (for reflect padding).
        - Output: `(B, num_ang_bins * num_spatial_bins ** 2, gh, gw)` float32 (128 channels by default).

    Example:
        >>> sift = DenseSIFT(grid_size=(4, 6), patch_size=16)
        >>> features = sift(torch.rand(2, 3, 32, 48))
        >>> features.shape, features.dtype
        (torch.Size([2, 128, 4, 6]), torch.float32)
        >>> torch.allclose(features.norm(dim=1), torch.ones(2, 4, 6))
        True
    """

    name = "sift"

    def __init__(
        self,
        grid_size: int | tuple[int, int] = 64,
        patch_size: int = 32,
        *,
        num_ang_bins: int = 8,
        num_spatial_bins: int = 4,
        rootsift: bool = True,
        chunk_size: int = 256,
    ) -> None:
        super().__init__(grid_size)
        self.patch_size = check_int("patch_size", patch_size, minimum=4)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        num_ang_bins = check_int("num_ang_bins", num_ang_bins, minimum=1)
        num_spatial_bins = check_int("num_spatial_bins", num_spatial_bins, minimum=1)
        if not isinstance(rootsift, bool):
            raise ValueError(f"Expected `rootsift` to be a bool, but got {rootsift!r}.")
        self.descriptor = SIFTDescriptor(
            self.patch_size, num_ang_bins=num_ang_bins, num_spatial_bins=num_spatial_bins, rootsift=rootsift
        )

    @property
    def num_channels(self) -> int:
        """Channels of the descriptor: `num_ang_bins * num_spatial_bins ** 2`.

        Example:
            >>> DenseSIFT().num_channels, DenseSIFT(num_ang_bins=4, num_spatial_bins=2).num_channels
            (128, 16)
        """
        return self.descriptor.num_ang_bins * self.descriptor.num_spatial_bins**2

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Dense SIFT descriptors on the grid.

        Args:
            images: `(B, 3, H, W)` float images with values in [0, 1].

        Returns:
            `(B, num_channels, gh, gw)` float32 descriptors, unit L2 norm per cell.

        Raises:
            ValueError: if an image side is too small to reflect-pad the border patches.

        Example:
            >>> DenseSIFT(grid_size=2, patch_size=8).extract(torch.rand(1, 3, 16, 16)).shape
            torch.Size([1, 128, 2, 2])
        """
        batch, _, height, width = images.shape
        rows, cols = self.grid_size
        size = self.patch_size
        gray = rgb_to_grayscale(images.float())  # (B, 1, H, W)

        row_starts = _patch_starts(height, rows, size)
        col_starts = _patch_starts(width, cols, size)
        pad_top, pad_bottom = max(0, -int(row_starts[0])), max(0, int(row_starts[-1]) + size - height)
        pad_left, pad_right = max(0, -int(col_starts[0])), max(0, int(col_starts[-1]) + size - width)
        if max(pad_top, pad_bottom) >= height or max(pad_left, pad_right) >= width:
            raise ValueError(
                f"Expected `images` with sides larger than half of patch_size={size} (for reflect padding), "
                f"but got shape {shape_str(images.shape)}."
            )
        if pad_top or pad_bottom or pad_left or pad_right:
            gray = F.pad(gray, (pad_left, pad_right, pad_top, pad_bottom), mode="reflect")
        offsets = torch.arange(size, dtype=torch.int64)
        row_index = (row_starts + pad_top)[:, None] + offsets  # (gh, P)
        col_index = (col_starts + pad_left)[:, None] + offsets  # (gw, P)
        row_index, col_index = row_index.to(gray.device), col_index.to(gray.device)

        gray = gray[:, 0]  # (B, H', W')
        descriptors = gray.new_empty(batch, rows, cols, self.num_channels)
        rows_per_chunk = max(1, self.chunk_size // (batch * cols))
        for start in range(0, rows, rows_per_chunk):
            stop = min(rows, start + rows_per_chunk)
            # (B, r, P, W') then (B, r, P, gw, P) -> (B, r, gw, P, P)
            strip = gray[:, row_index[start:stop]]
            patches = strip[:, :, :, col_index].permute(0, 1, 3, 2, 4)
            patches = patches.reshape(-1, 1, size, size)
            # Very wide grids: still at most `chunk_size` patches per call (when a row alone exceeds it).
            out = torch.cat([self.descriptor(part) for part in patches.split(self.chunk_size)])
            descriptors[:, start:stop] = out.reshape(batch, stop - start, cols, -1)
        return descriptors.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, patch_size={self.patch_size}, chunk_size={self.chunk_size}"
