"""Markdown tables of a `kvjax eval` results folder: per prompt length, one row per policy run, accuracy per
task (string match; digit score in brackets), the mean over tasks, and the KV reduction vs Full.

    python benchmarks/study_tables.py docs/smollm2/study [docs/smollm2/study_query_aware ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def tables(folder: Path) -> str:
    rows = json.loads((folder / "results.json").read_text())["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for length in sorted({r["length"] for r in rows}):
        here = [r for r in rows if r["length"] == length]
        labels = list(dict.fromkeys(r["policy"] for r in here))
        out.append(f"### {folder.name}, {length} tokens\n")
        out.append("| policy | KV reduction | " + " | ".join(tasks) + " | mean |")
        out.append("|---|---:|" + "---:|" * (len(tasks) + 1))
        for label in labels:
            cells = {r["task"]: r for r in here if r["policy"] == label}
            scores = [cells[t]["accuracy"] for t in tasks if t in cells]
            reduction = sum(c["kv_reduction_x"] for c in cells.values()) / len(cells)
            text = [f"{cells[t]['accuracy']:.1f} ({cells[t]['digits']:.2f})" if t in cells else "" for t in tasks]
            mean = f"{sum(scores) / len(scores):.2f}" + ("" if len(scores) == len(tasks) else "*")
            out.append(f"| {label} | {reduction:.2f}x | " + " | ".join(text) + f" | {mean} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n".join(tables(Path(p)) for p in sys.argv[1:]))
