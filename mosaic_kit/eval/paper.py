"""The MOSAIC paper's published tables, and a run's summary printed beside them
(`dreambench_paper_table`, `xversebench_paper_table`).

Values are quoted from the MOSAIC paper (She et al., "MOSAIC: Multi-Subject Personalized
Generation via Correspondence-Aware Alignment and Disentanglement"): Table 1 (DreamBench) and
Table 2 (XVerseBench); the other methods' rows are the paper's numbers for them, not ours.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DREAMBENCH_TABLE", "PAPER_SOURCE", "XVERSEBENCH_TABLE", "dreambench_paper_table", "xversebench_paper_table"]

PAPER_SOURCE = ("She et al., MOSAIC: Multi-Subject Personalized Generation via Correspondence-Aware Alignment "
                "and Disentanglement")
"""The paper the published rows are quoted from."""

DREAMBENCH_TABLE: dict[str, dict[str, tuple[float, float, float]]] = {
    "single": {
        "DreamBooth": (80.30, 30.52, 66.81),
        "BLIP-Diffusion": (80.47, 30.24, 69.82),
        "SSR-Encoder": (82.10, 30.79, 61.22),
        "MS-Diffusion": (80.82, 31.05, 70.32),
        "UNO": (83.50, 30.41, 75.97),
        "DreamO": (83.35, 30.61, 76.03),
        "XVerse": (83.20, 30.20, 75.44),
        "MOSAIC": (84.30, 31.64, 77.40),
    },
    "multi": {
        "MS-Diffusion": (72.60, 31.91, 52.50),
        "UNO": (73.29, 32.23, 54.22),
        "DreamO": (73.32, 32.10, 52.17),
        "XVerse": (73.47, 31.20, 53.71),
        "MOSAIC": (76.30, 32.40, 56.83),
    },
}
"""Table 1 of the MOSAIC paper: (CLIP-I, CLIP-T, DINO) per setting and method."""

XVERSEBENCH_TABLE: dict[str, tuple[tuple[float, ...], tuple[float, ...], float]] = {
    "MS-Diffusion": ((96.89, 6.52, 55.71, 59.63, 54.69), (87.21, 3.77, 46.21, 55.91, 48.28), 51.49),
    "UNO": ((89.65, 47.91, 80.40, 55.90, 68.47), (85.28, 31.82, 67.00, 54.24, 59.59), 64.03),
    "DreamO": ((96.93, 75.48, 70.84, 54.57, 74.46), (88.80, 50.24, 64.63, 52.47, 64.04), 69.25),
    "OmniGen2": ((92.60, 62.41, 74.08, 52.34, 70.36), (91.55, 40.81, 67.15, 51.40, 62.73), 66.55),
    "XVerse": ((93.69, 79.48, 76.86, 56.84, 76.72), (88.26, 66.59, 71.48, 53.97, 70.08), 73.40),
    "MOSAIC": ((96.55, 81.98, 80.92, 60.77, 80.05), (88.94, 69.90, 74.27, 55.02, 72.03), 76.04),
}
"""Table 2 of the MOSAIC paper: per method, single-subject (DPG, ID-Sim, IP-Sim, AES, AVG),
multi-subject (the same) and Overall."""


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"


def xversebench_paper_table(summary: dict, name: str = "this run") -> str:
    """Table 2's layout with the paper's rows and the run's row (bold) below them.

    Args:
        summary: `mosaic_kit.eval.xversebench.summarize` output (missing splits or metrics print n/a).
        name: the run's row label.

    Returns:
        Markdown: the table, then a line naming the source of the published rows.

    Example:
        >>> summary = {"single": {"dpg": 90.0, "id_sim": 70.0, "ip_sim": 75.0, "aes": 55.0, "avg": 72.5}, "overall": None}
        >>> print(xversebench_paper_table(summary).splitlines()[-3])
        | **this run** | 90.00 | 70.00 | 75.00 | 55.00 | 72.50 | n/a | n/a | n/a | n/a | n/a | n/a |
    """
    columns = ("DPG", "ID-Sim", "IP-Sim", "AES", "AVG")
    lines = [
        "| Method | " + " | ".join(f"Single {c}" for c in columns) + " | " + " | ".join(f"Multi {c}" for c in columns)
        + " | Overall |",
        "|---" * (2 * len(columns) + 2) + "|",
    ]
    for method, (single, multi, overall) in XVERSEBENCH_TABLE.items():
        lines.append(f"| {method} | " + " | ".join(_cell(v) for v in (*single, *multi, overall)) + " |")
    keys = ("dpg", "id_sim", "ip_sim", "aes", "avg")
    ours = [summary.get(split, {}).get(key) for split in ("single", "multi") for key in keys] + [summary.get("overall")]
    lines.append(f"| **{name}** | " + " | ".join(_cell(v) for v in ours) + " |")
    lines += ["", f"Published rows: {PAPER_SOURCE}, Table 2 (XVerseBench)."]
    return "\n".join(lines) + "\n"


def dreambench_paper_table(summary: dict, name: str = "this run") -> str:
    """Table 1's layout (per setting: method, CLIP-I, CLIP-T, DINO) with the paper's rows and the
    run's row (bold) at the end of each setting present in `summary`.

    Args:
        summary: `mosaic_kit.eval.summarize` output (DreamBench).
        name: the run's row label.

    Returns:
        Markdown: the table, then a line naming the source of the published rows.

    Example:
        >>> row = {"clip_i": 84.0, "clip_t": 31.0, "dino": 77.0}
        >>> print(dreambench_paper_table({"single": row}).splitlines()[10])
        | Single-Subject | **this run** | 84.00 | 31.00 | 77.00 |
    """
    lines = ["| Setting | Method | CLIP-I | CLIP-T | DINO |", "|---|---|---|---|---|"]
    titles = {"single": "Single-Subject", "multi": "Multi-Subject"}
    for setting, rows in DREAMBENCH_TABLE.items():
        if setting not in summary:
            continue
        for method, values in rows.items():
            lines.append(f"| {titles[setting]} | {method} | " + " | ".join(_cell(v) for v in values) + " |")
        entry = summary[setting]
        lines.append(f"| {titles[setting]} | **{name}** | "
                     + " | ".join(_cell(entry.get(k)) for k in ("clip_i", "clip_t", "dino")) + " |")
    lines += ["", f"Published rows: {PAPER_SOURCE}, Table 1 (DreamBench)."]
    return "\n".join(lines) + "\n"
