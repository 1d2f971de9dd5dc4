"""The report of a run: MOSAIC's overhead per row, the terminal table and the docs table.

A row of a report is one measurement ``{"config", "mode", "quantize", "peak_bytes", ...}``;
reports written before ``quantize`` existed read as ``"none"`` (a bf16 base)."""

from __future__ import annotations

from .configs import MODES

GIB = 2**30
OVERHEAD_LIMIT_PCT = 0.1
"""The acceptance bound: MOSAIC's extra over the plain step, in percent of the plain step's peak."""


def row_key(row: dict) -> tuple[str, str, str]:
    """``(config, mode, quantize)`` of a row."""
    return row["config"], row["mode"], row.get("quantize", "none")


def groups(rows: list[dict]) -> list[tuple[str, str]]:
    """``(config, quantize)`` of the rows, in order of appearance."""
    return list(dict.fromkeys((r["config"], r.get("quantize", "none")) for r in rows))


def overheads(rows: list[dict]) -> list[dict]:
    """Per configuration and base: MOSAIC's and the dense maps' peak over the plain step's, and
    whether MOSAIC's stays within `OVERHEAD_LIMIT_PCT`."""
    by = {row_key(r): r for r in rows}
    out = []
    for name, quantize in groups(rows):
        plain = by.get((name, "plain", quantize))
        if plain is None:
            continue
        entry = {"config": name, "quantize": quantize, "plain_bytes": plain["peak_bytes"]}
        for mode in ("mosaic", "dense"):
            row = by.get((name, mode, quantize))
            if row is not None:
                extra = row["peak_bytes"] - plain["peak_bytes"]
                entry[f"{mode}_extra_bytes"] = extra
                entry[f"{mode}_extra_pct"] = 100 * extra / plain["peak_bytes"]
                if "flops" in row and "flops" in plain:
                    entry[f"{mode}_flops_pct"] = 100 * (row["flops"] / plain["flops"] - 1)
        if "mosaic_extra_pct" in entry:
            entry["mosaic_within_limit"] = entry["mosaic_extra_pct"] <= OVERHEAD_LIMIT_PCT
        out.append(entry)
    return out


def encoders_bytes(report: dict, name: str) -> int | None:
    """The bf16 weights of a configuration's frozen encoders, or None when not measured."""
    encoders = report.get("encoders", {}).get(report["configs"][name].get("encoders") or "", [])
    return sum(e["bytes_bf16"] for e in encoders) if encoders else None


def signed_bytes(value: int) -> str:
    """``+0.21 GiB`` or ``+2.8 MiB``."""
    if abs(value) >= GIB / 10:
        return f"{value / GIB:+.2f} GiB"
    return f"{value / 2**20:+.1f} MiB"


def base_name(quantize: str) -> str:
    return {"none": "bf16", "int8": "int8", "nf4": "NF4"}.get(quantize, quantize)


def format_report(report: dict) -> str:
    """The table of a report: one row per configuration and base, peaks per mode, encoders, FLOPs."""
    from mosaic_kit.reporting import format_table

    by = {row_key(r): r for r in report["results"]}
    ratio = any("ratio_to_fake" in r for r in report["results"])
    header = ["configuration", "base", "base (GiB)", "LoRA (GiB)", "plain (GiB)", "+ MOSAIC", "+ dense maps",
              "encoders (GiB)", "MOSAIC FLOPs"]
    if ratio:
        header.append("measured / fake")
    table = [header]
    for name, quantize in groups(report["results"]):
        plain, mosaic, dense = (by.get((name, m, quantize)) for m in MODES)
        first = plain or mosaic or dense
        cells = [name, base_name(quantize), f"{first['base_bytes'] / GIB:.2f}", f"{first['lora_bytes'] / GIB:.2f}"]
        cells.append(f"{plain['peak_bytes'] / GIB:.2f}" if plain else "-")
        for row in (mosaic, dense):
            if row is None:
                cells.append("-")
            elif plain is None:
                cells.append(f"{row['peak_bytes'] / GIB:.2f}")
            else:
                cells.append(f"{row['peak_bytes'] / GIB:.2f} ({signed_bytes(row['peak_bytes'] - plain['peak_bytes'])})")
        encoders = encoders_bytes(report, name)
        cells.append("-" if encoders is None else f"{encoders / GIB:.2f}")
        if plain and mosaic and "flops" in plain and "flops" in mosaic:
            cells.append(f"{100 * (mosaic['flops'] / plain['flops'] - 1):+.2f} %")
        else:
            cells.append("-")
        if ratio:
            cells.append(" / ".join(f"{by[(name, m, quantize)]['ratio_to_fake']:.3f}" for m in MODES
                                    if "ratio_to_fake" in by.get((name, m, quantize), {})))
        table.append(cells)
    return format_table(table)


def format_markdown(report: dict) -> str:
    """The docs table of a report (GiB): per configuration and frozen base, the plain LoRA step,
    + MOSAIC with its extra over the plain step (and whether it is within 0.1 % of the peak),
    + the released-style dense maps, the encoders' bf16 weights, and the peak with MOSAIC for
    cached encoders (the step alone) and for live encoders (the step + the encoders)."""
    by = {row_key(r): r for r in report["results"]}
    lines = ["| configuration | base | LoRA step | + MOSAIC (capture, SCAL, MDL) | MOSAIC ≤ 0.1 % | "
             "+ dense maps (released style) | encoders, bf16 | cached encoders | live encoders | MOSAIC FLOPs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, quantize in groups(report["results"]):
        cfg = report["configs"][name]
        plain, mosaic, dense = (by.get((name, m, quantize)) for m in MODES)
        cells = [describe_short(cfg), base_name(quantize), _gib(plain)]
        if mosaic is None or plain is None:
            cells += [_gib(mosaic), "-"]
        else:
            extra = mosaic["peak_bytes"] - plain["peak_bytes"]
            pct = 100 * extra / plain["peak_bytes"]
            cells += [f"{mosaic['peak_bytes'] / GIB:.2f} GiB ({signed_bytes(extra)})",
                      f"{'yes' if pct <= OVERHEAD_LIMIT_PCT else 'no'} ({pct:+.3f} %)"]
        cells.append("-" if dense is None or plain is None else
                     f"{dense['peak_bytes'] / GIB:.2f} GiB ({signed_bytes(dense['peak_bytes'] - plain['peak_bytes'])})")
        encoders = encoders_bytes(report, name)
        cells.append("-" if encoders is None else f"{encoders / GIB:.2f} GiB")
        step = mosaic or plain
        live = cfg.get("live_encoders")
        cells.append("-" if step is None or live is True else f"{step['peak_bytes'] / GIB:.2f} GiB")
        cells.append("-" if step is None or encoders is None or live is False
                     else f"{(step['peak_bytes'] + encoders) / GIB:.2f} GiB")
        cells.append(f"{100 * (mosaic['flops'] / plain['flops'] - 1):+.1f} %"
                     if plain and mosaic and "flops" in plain and "flops" in mosaic else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gib(row: dict | None) -> str:
    return "-" if row is None else f"{row['peak_bytes'] / GIB:.2f} GiB"


def describe(cfg: dict) -> str:
    """One line for ``--list``."""
    t = cfg["transformer"]
    blocks = f"{t['num_layers']}+{t.get('num_single_layers', 0)} blocks"
    text = (f"{cfg['family']}, {blocks}, {t['num_attention_heads']}x{t['attention_head_dim']}, "
            f"{cfg['size']}² target, {cfg['refs']} x {cfg['ref_size']}² refs, {cfg['text_tokens']} text tokens, "
            f"LoRA rank {cfg['rank']}")
    if "recipe" in cfg:
        text += f"; {cfg['recipe']}: {base_name(cfg['quantize'])} base, {_encoders_word(cfg)} encoders"
    return text


def describe_short(cfg: dict) -> str:
    """The docs table's name of a configuration."""
    text = f"{cfg['model']}, {cfg['size']}² target, {cfg['refs']} × {cfg['ref_size']}² refs"
    if "recipe" in cfg:
        text = f"`{cfg['recipe'].rsplit('/', 1)[-1]}`: {text}, {_encoders_word(cfg)} encoders"
    return text


def _encoders_word(cfg: dict) -> str:
    return "live" if cfg.get("live_encoders") else "cached"
