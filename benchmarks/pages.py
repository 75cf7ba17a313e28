"""Markdown tables shared by the benchmarks' result pages."""

from __future__ import annotations

from fractions import Fraction


def ratio_name(alpha: float) -> str:
    """0.0625 -> '1/16'."""
    return str(Fraction(alpha).limit_denominator(1024))


def ratio_tables(rows: list[dict], label: str, ratios: list[float], tables: list[tuple[str, str, str]]) -> str:
    """One markdown table per (title, key, format) in `tables`: a line per value of row[label] (in
    order of first appearance; values without `key` left out), a column per ratio (row["alpha"])."""
    by = {(r[label], r["alpha"]): r for r in rows}
    names = list(dict.fromkeys(r[label] for r in rows))
    head = f"| {label} | " + " | ".join(ratio_name(a) for a in ratios) + " |\n|---|" + "---|" * len(ratios) + "\n"
    lines = []
    for title, key, fmt in tables:
        lines.append(f"\n## {title}\n\n" + head)
        for v in names:
            if key in by.get((v, ratios[0]), {}):
                lines.append(f"| {v} | " + " | ".join(format(by[v, a][key], fmt) for a in ratios) + " |\n")
    return "".join(lines)
