"""Tables and figures of the synthetic-world evaluation: `summarise_records` and
`ablation_table` aggregate records over samples and seeds, `plot_metric_against_k` and
`plot_attention_maps` (the paper's Fig. 6 manner) draw them with matplotlib (imported lazily).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ...utils.atomic import atomic_write
from .scores import METRICS

__all__ = ["INTERVALS", "ablation_table", "mean_interval", "plot_attention_maps", "plot_metric_against_k",
           "summarise_records"]

INTERVALS = ("std", "t95")
"""Spreads `ablation_table` prints after ``±``: the standard deviation over seeds (``std``) or the
half-width of the two-sided 95 % Student-t interval of the mean (``t95``)."""

# two-sided 95 % quantiles t(0.975, df) of Student's t for df = 1…30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# ----------------------------------------------------------------------------- aggregation
def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def summarise_records(records: Sequence[Mapping], by: Sequence[str] = ("num_refs",),
                      metrics: Sequence[str] | None = None) -> list[dict]:
    """Means of record metrics grouped by keys (NaN values skipped; a group with none is NaN).

    Denoising records contribute the teacher-forced metrics (averaged over their noise levels
    unless ``"sigma"`` is in ``by``), generation records the sample metrics.

    Args:
        records: dicts such as `SyntheticEvalResult.records`.
        by: the grouping keys (present in every record); ``()`` gives one overall row.
        metrics: metric keys (default: every key of `METRICS`).

    Returns:
        One dict per group, sorted by the group keys: the keys of ``by`` then each metric's mean.

    Example:
        >>> records = [{"kind": "denoise", "num_refs": 1, "hit_rate": 0.5},
        ...            {"kind": "denoise", "num_refs": 1, "hit_rate": 1.0},
        ...            {"kind": "generation", "num_refs": 1, "sample_ncc": 0.2}]
        >>> summarise_records(records, metrics=["hit_rate", "sample_ncc"])
        [{'num_refs': 1, 'hit_rate': 0.75, 'sample_ncc': 0.2}]
    """
    metrics = list(METRICS) if metrics is None else list(metrics)
    groups: dict[tuple, list[Mapping]] = {}
    for record in records:
        missing = [key for key in by if key not in record]
        if missing and record.get("kind") == "denoise":
            raise ValueError(f"Expected every record to hold the grouping keys {list(by)}, but one lacks {missing}.")
        if missing:
            continue
        groups.setdefault(tuple(record[key] for key in by), []).append(record)
    rows = []
    for key in sorted(groups, key=lambda values: tuple((0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in values)):
        row = dict(zip(by, key))
        for metric in metrics:
            row[metric] = _mean([r[metric] for r in groups[key] if metric in r])
        rows.append(row)
    return rows


def _spread(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return sum(finite) / len(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def mean_interval(values: Sequence[float], interval: str = "t95") -> tuple[float, float]:
    """The mean of the finite ``values`` and its spread: the standard deviation (``"std"``) or
    the half-width of the two-sided 95 % Student-t confidence interval of the mean,
    ``t(0.975, n - 1) · s / √n`` (``"t95"``; NaN for a single value, where no interval exists).

    Args:
        values: the per-seed values (NaNs skipped).
        interval: one of `INTERVALS`.

    Returns:
        ``(mean, spread)``; both NaN without a finite value.

    Raises:
        ValueError: an unknown ``interval``.

    Example:
        >>> mean, half = mean_interval([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.303
        >>> mean, round(half, 3)
        (2.0, 2.484)
    """
    if interval not in INTERVALS:
        raise ValueError(f"Expected `interval` to be one of {list(INTERVALS)}, but got {interval!r}.")
    mean, std = _spread([float(v) for v in values])
    if interval == "std" or not math.isfinite(mean):
        return mean, std
    n = sum(1 for v in values if math.isfinite(float(v)))
    if n < 2:
        return mean, float("nan")
    quantile = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, quantile * std / math.sqrt(n)


def ablation_table(per_run: Mapping[str, Sequence[Mapping]], metrics: Sequence[str] | None = None,
                   reference_rows: Mapping[str, Mapping] | None = None, digits: int = 3,
                   interval: str = "std") -> str:
    """The markdown table of an ablation: per setting, mean ± spread over seeds (`mean_interval`).

    Args:
        per_run: setting name → one summary row per seed (e.g. ``summarise_records(records, by=())[0]``).
        metrics: columns (default: every key of `METRICS`); titles from `METRICS`.
        reference_rows: extra rows without spread (e.g. ``{"ground truth": {...}}``); metrics they
            lack show as "–".
        digits: decimals.
        interval: the spread after ``±``, one of `INTERVALS`: ``std`` (standard deviation, the
            default) or ``t95`` (half-width of the 95 % t-interval of the mean; one seed: no ``±``).

    Returns:
        The table as markdown.

    Example:
        >>> print(ablation_table({"a": [{"hit_rate": 0.1}, {"hit_rate": 0.3}]}, metrics=["hit_rate"]))
        | setting | seeds | hit-rate ↑ |
        | --- | --- | --- |
        | a | 2 | 0.200 ± 0.141 |
        >>> print(ablation_table({"a": [{"hit_rate": 0.1}, {"hit_rate": 0.3}]}, metrics=["hit_rate"], interval="t95"))
        | setting | seeds | hit-rate ↑ |
        | --- | --- | --- |
        | a | 2 | 0.200 ± 1.271 |
    """
    if interval not in INTERVALS:
        raise ValueError(f"Expected `interval` to be one of {list(INTERVALS)}, but got {interval!r}.")
    metrics = list(METRICS) if metrics is None else list(metrics)
    titles = [METRICS[m][0] if m in METRICS else m for m in metrics]
    lines = ["| setting | seeds | " + " | ".join(titles) + " |", "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for name, rows in per_run.items():
        cells = []
        for metric in metrics:
            mean, spread = mean_interval([float(r.get(metric, float("nan"))) for r in rows], interval)
            if not math.isfinite(mean):
                cells.append("–")
            elif not math.isfinite(spread):
                cells.append(f"{mean:.{digits}f}")
            else:
                cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    for name, row in (reference_rows or {}).items():
        cells = []
        for metric in metrics:
            value = float(row.get(metric, float("nan")))
            cells.append("–" if not math.isfinite(value) else f"{value:.{digits}f}")
        lines.append(f"| {name} | – | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("The synthetic-ablation figures need matplotlib: `pip install mosaic_kit[train]`.") from error
    return plt


def plot_metric_against_k(
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    path: str | Path,
    metrics: Sequence[str],
    references: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
) -> Path:
    """Line plots of metrics against K: one panel per metric, one line per setting (mean over
    seeds, shaded ± one standard deviation), dashed reference lines (e.g. ground truth, chance).

    Args:
        curves: ``{metric: {setting: {K: [one value per seed]}}}``.
        path: the PNG to write (parent folders are created).
        metrics: the metrics to draw, in panel order (keys of ``curves``).
        references: ``{metric: {label: {K: value}}}`` dashed lines.

    Returns:
        The path.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "k.png"
        >>> curves = {"hit_rate": {"a": {1: [0.1, 0.2], 2: [0.2, 0.3]}}}
        >>> plot_metric_against_k(curves, out, ["hit_rate"]).stat().st_size > 0
        True
    """
    plt = _pyplot()
    for metric in metrics:
        if metric not in curves:
            raise ValueError(f"Expected every metric in `curves`, but {metric!r} is missing (got {sorted(curves)}).")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for setting, per_k in curves[metric].items():
            ks = sorted(per_k)
            stats = [_spread(list(per_k[k])) for k in ks]
            means = [s[0] for s in stats]
            stds = [s[1] for s in stats]
            line = ax.plot(ks, means, marker="o", label=setting)[0]
            ax.fill_between(ks, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
        for label, per_k in ((references or {}).get(metric) or {}).items():
            ks = sorted(per_k)
            ax.plot(ks, [per_k[k] for k in ks], linestyle="--", color="grey" if "chance" in label else "black",
                    linewidth=1, label=label)
        ax.set_title(METRICS[metric][0] if metric in METRICS else metric)
        ax.set_xlabel("K (references)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    with_references = [ax for ax, metric in zip(axes[0], metrics) if (references or {}).get(metric)]
    if with_references and with_references[0] is not axes[0][0]:
        with_references[0].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


_REF_COLOURS = ((0.90, 0.10, 0.10), (0.10, 0.45, 0.95), (0.10, 0.75, 0.20), (0.95, 0.60, 0.05),
                (0.65, 0.20, 0.85), (0.05, 0.80, 0.80), (0.95, 0.30, 0.70), (0.40, 0.40, 0.40))


def plot_attention_maps(figures: Mapping[str, Mapping], path: str | Path) -> Path:
    """Attention-map figure in the manner of the paper's Fig. 6: one row per setting; the
    references, the target with the subjects' outlines, then each reference's aggregated attention
    over the target (`reference_attention_maps`) with its peak marked, and all references at once
    (one colour per reference, brightness = attention).

    Args:
        figures: setting → `SyntheticEvalResult.figure` (all for the same sample).
        path: the PNG to write.

    Returns:
        The path.

    Example:
        >>> import tempfile
        >>> fig = {"num_refs": 2, "index": 0, "sigma": 0.5, "maps": torch.rand(2, 4, 4), "valid": torch.ones(2, dtype=torch.bool),
        ...        "target": torch.rand(3, 16, 16), "references": torch.rand(2, 3, 8, 8),
        ...        "token_masks": torch.rand(2, 4, 4) > 0.5}
        >>> plot_attention_maps({"a": fig}, Path(tempfile.mkdtemp()) / "maps.png").exists()
        True
    """
    plt = _pyplot()
    if not figures:
        raise ValueError("Expected at least one setting in `figures`, but got none.")
    first = next(iter(figures.values()))
    k = int(first["num_refs"])
    columns = 2 + k + 1
    fig, axes = plt.subplots(len(figures), columns, figsize=(1.9 * columns, 2.0 * len(figures) + 0.4), squeeze=False)
    for row, (setting, item) in enumerate(figures.items()):
        target = item["target"].permute(1, 2, 0).clamp(0, 1).numpy()
        height, width = target.shape[:2]
        refs = item["references"]
        strip = torch.cat([refs[j] for j in range(k)], dim=1).permute(1, 2, 0).clamp(0, 1).numpy()
        axes[row][0].imshow(strip)
        axes[row][0].set_ylabel(setting, fontsize=9)
        axes[row][1].imshow(target)
        maps = item["maps"].float()
        rows, cols = maps.shape[-2:]
        up = F.interpolate(maps[:, None], size=(height, width), mode="nearest")[:, 0]
        masks = F.interpolate(item["token_masks"].float()[:, None], size=(height, width), mode="nearest")[:, 0]
        combined = torch.zeros(height, width, 3)
        for j in range(k):
            colour = _REF_COLOURS[j % len(_REF_COLOURS)]
            axes[row][1].contour(masks[j].numpy(), levels=[0.5], colors=[colour], linewidths=1.2)
            ax = axes[row][2 + j]
            ax.imshow(target * 0.35 + 0.65)
            heat = up[j] / up[j].max().clamp_min(1e-12)
            ax.imshow(heat.numpy(), cmap="magma", alpha=0.75, vmin=0, vmax=1)
            ax.contour(masks[j].numpy(), levels=[0.5], colors=[colour], linewidths=1.2)
            peak = int(maps[j].flatten().argmax())
            scale_y, scale_x = height / rows, width / cols
            ax.plot([(peak % cols + 0.5) * scale_x - 0.5], [(peak // cols + 0.5) * scale_y - 0.5], marker="x",
                    color="white", markersize=7, mew=2)
            if row == 0:
                ax.set_title(f"ref {j + 1} → target", fontsize=9, color=colour)
            combined += heat[..., None] * torch.tensor(colour)
        axes[row][-1].imshow((combined / combined.max().clamp_min(1e-12)).numpy())
        if row == 0:
            axes[row][0].set_title("references", fontsize=9)
            axes[row][1].set_title("target (σ-noised in eval)", fontsize=9)
            axes[row][-1].set_title("all references", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"aggregated attention of each reference over the target (K = {k}, σ = {first['sigma']})", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    """Saves a matplotlib figure as PNG (atomically, creating the folder), closes it and returns the path."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda stream: fig.savefig(stream, dpi=110, format="png"))
    finally:
        plt.close(fig)
