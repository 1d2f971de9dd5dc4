"""Position ids of several FLUX.1-Kontext references by the methods of ComfyUI's
``FluxKontextMultiReferenceLatentMethod`` node (``comfy/ldm/flux/model.py``, the ``ref_latents`` loop)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["REFERENCE_METHODS", "kontext_reference_ids"]

REFERENCE_METHODS = ("offset", "index", "uxo")
"""``offset`` (Kontext's default): every reference at index 1, each next one shifted past the
previous ones in height or width (they tile side by side); ``index``: reference k (1-based) at
index ``k · index_scale``, no spatial offset (needs a model trained for it); ``uxo`` (UNO style):
index 0, each reference shifted diagonally past the target and the previous references."""


def kontext_reference_ids(target: tuple[int, int], references: Sequence[tuple[int, int]], method: str = "offset",
                          index_scale: int = 1) -> torch.Tensor:
    """The ``(index, row, col)`` position ids of K references after a target, in tokens: ComfyUI's
    (which counts offsets in latent cells, ``(cells + 1) // 2`` tokens: whole tokens here, as sides
    are multiples of 16 px). With one reference, ``offset`` and ``index`` give the stock ids.

    Args:
        target: ``(rows, cols)`` of the target's token grid.
        references: ``(rows, cols)`` of each reference's token grid, in slot order.
        method: one of `REFERENCE_METHODS`.
        index_scale: the ``index`` method's step (ComfyUI's ``ref_index_scale``; 1 for Kontext).

    Returns:
        ``(N_ref, 3)`` float32 ids, the references' row-major grids concatenated.

    Raises:
        ValueError: an unknown ``method``, or sizes that are not pairs of positive ints.

    Example:
        >>> kontext_reference_ids((2, 2), [(1, 2), (1, 1)], "offset").tolist()  # 2nd below the 1st
        [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
        >>> kontext_reference_ids((2, 2), [(1, 1), (1, 1)], "index")[:, 0].tolist()
        [1.0, 2.0]
        >>> kontext_reference_ids((2, 2), [(1, 1), (1, 1)], "uxo").tolist()  # diagonal after the target
        [[0.0, 2.0, 2.0], [0.0, 3.0, 3.0]]
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"Expected `method` to be one of {REFERENCE_METHODS}, but got {method!r}.")
    sizes = [tuple(target), *map(tuple, references)]
    if not all(len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s) for s in sizes):
        raise ValueError(f"Expected `target` and `references` as (rows, cols) of positive ints, but got {sizes!r}.")
    ids, used_rows, used_cols, index = [], 0, 0, 0  # the tokens the references take so far
    for rows, cols in references:
        if method == "index":
            index, top, left = index + index_scale, 0, 0
        elif method == "uxo":
            index, top, left = 0, target[0] + used_rows, target[1] + used_cols
            used_rows, used_cols = used_rows + rows, used_cols + cols
        else:  # offset: extend the tiled area along its shorter side
            beside = rows + used_rows > cols + used_cols  # to the right, else below
            index, top, left = 1, 0 if beside else used_rows, used_cols if beside else 0
            used_rows, used_cols = max(used_rows, rows + top), max(used_cols, cols + left)
        grid = torch.cartesian_prod(torch.arange(rows) + top, torch.arange(cols) + left)
        ids.append(torch.cat([torch.full((rows * cols, 1), index), grid], dim=1))
    return torch.cat(ids).float() if ids else torch.zeros(0, 3)
