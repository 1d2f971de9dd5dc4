"""The training run's figures: loss curves, the validation contact sheet, and the attention panels
(paper Fig. 6) that show where each reference's annotated points attend in the target beside
the true target region."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..utils.atomic import atomic_write, save_image_atomic
from ..utils.images import tensor_to_pil

if TYPE_CHECKING:
    from ..correspondence import Correspondences, TokenGrid

log = logging.getLogger("mosaic_kit.reporting")

__all__ = ["attention_panels", "plot_loss_curves", "validation_sheet"]

_HEAT = torch.tensor([1.0, 0.15, 0.05])  # the attention overlay colour (red)
_REGION = torch.tensor([0.1, 0.85, 0.2])  # the true target region (green)


def _token_map(values: torch.Tensor, rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """``(N_tgt,)`` token values → ``(H, W)`` pixels (nearest: each token covers its patch)."""
    grid = values.float().reshape(1, 1, rows, cols)
    return torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")[0, 0]


def attention_panels(point_rows: torch.Tensor, corr: Correspondences, target_grid: TokenGrid, target: torch.Tensor, sample: int = 0,
                     ) -> list[tuple[Image.Image, Image.Image]]:
    """For each real reference of one sample: where its annotated points attend in the target (the
    captured attention, paper Fig. 6) and the true target region of those points.

    The attention map of reference ``k`` is the mean, over its real points ``p``, of the point
    rows ``A[G(u_p^k), :]`` over the target tokens, scaled to ``[0, 1]`` by its maximum and drawn
    in red over the dimmed target image; the true region marks in green the target tokens
    ``v_p^k`` the points correspond to.

    Args:
        point_rows: ``(B, K, P, N_tgt)`` attention rows of the annotated points
            (`mosaic_kit.attention.PointAttentionRows.result()`).
        corr: the batch's `Correspondences` (``point_mask``, ``tgt_index``, ``ref_present``).
        target_grid: the target's `TokenGrid` (``rows * cols == N_tgt``).
        target: ``(3, H, W)`` float image in ``[0, 1]`` (the ground-truth target).
        sample: which sample of the batch; defaults to 0.

    Returns:
        One ``(attention, true_region)`` pair of RGB images per reference that holds points, in
        reference order.

    Raises:
        ValueError: when ``point_rows`` is not ``(B, K, P, N_tgt)`` for ``corr``, or ``target`` is not
            ``(3, H, W)``.

    Example:
        >>> from mosaic_kit.correspondence import Correspondences, TokenGrid
        >>> corr = Correspondences.from_dicts([[{0: 5}, {1: 10}]], ref_tokens=[4, 4], tgt_tokens=16)
        >>> rows = torch.zeros(1, 2, 1, 16)
        >>> rows[0, 0, 0, 5] = rows[0, 1, 0, 3] = 1.0  # reference 0 attends in place, reference 1 does not
        >>> panels = attention_panels(rows, corr, TokenGrid(64, 64), torch.rand(3, 64, 64))
        >>> len(panels), panels[0][0].size
        (2, (64, 64))
    """
    batch, refs, points = corr.point_mask.shape
    expected = (batch, refs, points, corr.tgt_tokens)
    if not isinstance(point_rows, torch.Tensor) or tuple(point_rows.shape) != expected:
        got = tuple(point_rows.shape) if isinstance(point_rows, torch.Tensor) else type(point_rows).__name__
        raise ValueError(f"Expected `point_rows` of shape (B, K, P, N_tgt) = {expected}, but got {got}.")
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.shape[0] != 3:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"Expected `target` of shape (3, H, W), but got {got}.")
    if target_grid.rows * target_grid.cols != corr.tgt_tokens:
        raise ValueError(f"Expected `target_grid` with {corr.tgt_tokens} tokens, but got "
                         f"{target_grid.rows}x{target_grid.cols}.")
    height, width = target.shape[1:]
    dimmed = target.detach().float().cpu() * 0.45
    panels = []
    for k in range(refs):
        mask = corr.point_mask[sample, k].cpu()
        if not bool(mask.any()):
            continue
        heat = point_rows[sample, k].detach().float().cpu()[mask].mean(0)
        heat = heat / heat.max().clamp_min(1e-12)
        region = torch.zeros(corr.tgt_tokens)
        region[corr.tgt_index[sample, k].cpu()[mask]] = 1.0
        pixels = []
        for values, colour in ((heat, _HEAT), (region, _REGION)):
            alpha = _token_map(values, target_grid.rows, target_grid.cols, height, width)[None]
            pixels.append(tensor_to_pil(dimmed * (1 - alpha) + colour[:, None, None] * alpha))
        panels.append((pixels[0], pixels[1]))
    return panels


def validation_sheet(rows: Sequence, path: str | Path, title: str, thumb_size: int = 128) -> Path:
    """Writes the validation contact sheet (`mosaic_kit.eval.contact_sheet`) of ``rows`` to ``path``.

    Args:
        rows: `mosaic_kit.eval.SheetRow`s, one per validation item (and attention rows).
        path: the PNG to write (folders are created).
        title: the caption at the top.
        thumb_size: thumbnail side in pixels; defaults to 128.

    Returns:
        ``path``.

    Example:
        >>> import tempfile
        >>> from mosaic_kit.eval import SheetRow
        >>> out = validation_sheet([SheetRow("a", [Image.new("RGB", (8, 8))])], tempfile.mkdtemp() + "/s.png", "step 0")
        >>> out.is_file()
        True
    """
    from ..eval.sheets import contact_sheet

    return save_image_atomic(contact_sheet(list(rows), thumb_size=thumb_size, title=title), path)


def plot_loss_curves(history: list[dict], path: Path) -> Path | None:
    """Loss terms, LR, grad norm and hit-rate against the step, as a PNG (needs matplotlib).

    Args:
        history: the logged records (``step``, ``loss``, ``flow_matching``, ``scal``, ``mdl``,
            ``hit_rate``, ``grad_norm``, ``lr``; missing keys are drawn as gaps).
        path: the PNG to write.

    Returns:
        ``path``, or None when ``history`` is empty or matplotlib is missing.

    Example:
        >>> import tempfile
        >>> record = {"step": 1, "loss": 1.0, "flow_matching": 0.9, "scal": 0.1, "mdl": 0.0, "lr": 1e-4}
        >>> plot_loss_curves([record], Path(tempfile.mkdtemp()) / "c.png").is_file()
        True
    """
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curves (pip install mosaic_kit[train])")
        return None
    path = Path(path)
    steps = [r["step"] for r in history]
    panels = [("loss", ["loss", "flow_matching"]), ("MOSAIC terms", ["scal", "mdl"]),
              ("attention hit-rate", ["hit_rate"]), ("optimiser", ["grad_norm", "lr"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            values = [r.get(key, float("nan")) for r in history]
            if key == "lr":  # its own scale
                twin = ax.twinx()
                twin.plot(steps, values, label=key, color="tab:orange")
                twin.set_ylabel("lr", fontsize=8)
                twin.legend(fontsize=8, loc="lower right")
            else:
                ax.plot(steps, values, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda stream: fig.savefig(stream, dpi=100, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path
