"""Tables from benchmark results: plain text for the terminal, Markdown for docs/benchmarks.md.

``python bench/report.py bench/results/<file>.json`` prints the Markdown tables of a saved run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

SYSTEM_COLUMNS = ("adapterkit", "peft", "transformers", "floor")
RATIO_COLUMNS = ("adapterkit/peft", "adapterkit/transformers")


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms" if value < 0.1 else f"{value * 1e3:.0f} ms"
    return f"{value * 1e6:.0f} us"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def cell(row: dict[str, Any], column: str) -> str:
    if column in row["errors"]:
        error = row["errors"][column]
        return "n/a" if error.startswith("NotOffered") else "error"
    return fmt_seconds(row["seconds"].get(column))


def status(t: dict[str, Any]) -> str:
    """met / MISSED, or "within noise" when a miss is smaller than the spread of the paired ratios."""
    if t["value"] is None:
        return "no value"
    if t["met"]:
        return "met"
    return "within noise" if t.get("within_noise") else "MISSED"


def mark_noise(rows: list[dict[str, Any]]) -> None:
    """Mark forward misses that the spread of the paired ratios cannot tell from a pass.

    Active overhead vs peft's: missed by noise when the interquartile range of the paired adapterkit/peft
    ratios contains 1.0. Merged vs base: when that range of adapterkit/base reaches down to the limit.
    """
    for row in rows:
        iqrs = row.get("ratio_iqr", {})
        for t in row["targets"]:
            if t["met"] or t["value"] is None:
                continue
            if "overhead" in t["label"]:
                key, bound = "adapterkit/peft", 1.0
            elif t["label"].startswith("merged forward"):
                key, bound = "adapterkit/base", t["limit"]
            else:
                continue
            iqr = iqrs.get(key)
            if iqr and iqr[0] <= bound:
                t["within_noise"] = True
                t["detail"] = ((t.get("detail") or "") + f"; paired {key} IQR [{iqr[0]:.3f}, {iqr[1]:.3f}]").lstrip(
                    "; "
                )


def target_text(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return f"{t['label']}: no value"
    status_ = status(t)
    if "overhead" in t["label"]:
        value = f"{100 * t['value']:+.1f} pts"
    else:
        value = f"{t['value']:.2f}x (<= {t['limit']}x)"
    return f"{status_}: {value}"


def rows_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    header = ["measure", "size", "method", "case", *SYSTEM_COLUMNS, *RATIO_COLUMNS, "target"]
    body = []
    for row in rows:
        targets = "; ".join(target_text(t) for t in row["targets"]) or ""
        body.append(
            [
                row["measure"],
                row["size"],
                row["method"],
                row["variant"],
                *(cell(row, c) for c in SYSTEM_COLUMNS),
                *(fmt_ratio(row["ratios"].get(c)) for c in RATIO_COLUMNS),
                targets,
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    widths[3] = min(widths[3], 48)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append(
            "  ".join(str(v)[:w].ljust(w) if i == 3 else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    header = ["target", "size", "method", "case", "measured", "status", "detail"]
    body = []
    for row in rows:
        for t in row["targets"]:
            if t["value"] is None:
                measured = "-"
            elif "overhead" in t["label"]:
                measured = f"{100 * t['value']:+.1f} pts"
            else:
                measured = f"{t['value']:.2f}x"
            body.append(
                [t["label"], row["size"], row["method"], row["variant"], measured, status(t), t.get("detail", "")]
            )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))] if body else [10] * 7
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def errors_text(rows: list[dict[str, Any]]) -> str:
    seen = {}
    for row in rows:
        for column, error in row["errors"].items():
            if not error.startswith("NotOffered"):
                seen.setdefault((row["method"], column, error), []).append(f"{row['size']} {row['measure']}")
    return "\n".join(f"- {m} / {c}: {e} ({', '.join(sorted(set(w)))})" for (m, c, e), w in seen.items())


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        data = json.load(f)
    mark_noise(data["rows"])
    print(rows_table(data["rows"], markdown=True))
    print()
    print(targets_table(data["rows"], markdown=True))
    errors = errors_text(data["rows"])
    if errors:
        print("\nErrors:\n" + errors)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
