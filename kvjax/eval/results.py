"""What an evaluation leaves behind: the table it prints, the files it writes and the metadata that makes
them comparable (model, dtype, versions, device, commit, date, command).

Beside results.json / results.csv / samples.json, each policy gets a folder laid out as kvpress's
leaderboard writes one, `runs/<tasks>__<model>__<policy>/` with predictions.csv, metrics.json and
config.yaml.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import yaml

import kvjax

EVAL_COLUMNS = (
    ("task", "task"),
    ("length", "length"),
    ("policy", "policy"),
    ("accuracy", "accuracy"),
    ("digits", "digits"),
    ("kv_bytes", "kv_bytes/seq"),
    ("kv_reduction_x", "kv_reduction"),
    ("prefill_ms", "prefill_ms"),
    ("decode_ms_per_token", "decode_ms/tok"),
)
PREDICTION_COLUMNS = ("task", "length", "seed", "depth", "num_tokens", "answers", "prediction", "score", "digits")


def format_table(rows: list[dict], columns: tuple[tuple[str, str], ...] = EVAL_COLUMNS) -> str:
    """A plain-text table of the rows' (key, header) columns: text left-aligned, numbers right-aligned."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    header = [h for _, h in columns]
    body = [[cell(r.get(key)) for key, _ in columns] for r in rows]
    text = [any(isinstance(r.get(key), str) for r in rows) for key, _ in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if t else c.rjust(w) for c, w, t in zip(cells, widths, text))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def safe_name(label: str) -> str:
    """`label` as a file name: runs of anything but letters, digits, `_.-` become one `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def _commit() -> str | None:
    """The git commit kvjax runs from, when it runs from a checkout (None from an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(kvjax.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_metadata(model_name: str, dtype, command: list[str]) -> dict:
    """What a result needs to be compared with another: model, dtype, versions, device, commit, date and
    the command that made it."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "model": model_name,
        "dtype": str(dtype),
        "kvjax": importlib.metadata.version("kvjax"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(command),
    }


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _metrics(rows: list[dict]) -> dict:
    """Per task, per length: accuracy and digits (RULER's string_match_all, kvjax's digit score), n, bytes."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["task"], {})[str(r["length"])] = {
            "string_match_all": r["accuracy"],
            "digits": r["digits"],
            "samples": r["samples"],
            "kv_bytes": r["kv_bytes"],
            "kv_reduction_x": r["kv_reduction_x"],
        }
    return out


def write_run_folders(rows: list[dict], sample_rows: list[dict], out: Path, metadata: dict) -> list[Path]:
    """One folder per policy run, `runs/<tasks>__<model>__<policy>/`: predictions.csv, metrics.json and
    config.yaml (the policy, its budget, the tasks and lengths, and `metadata`). A folder of this model and
    policy under another task list (written before a resumed run added tasks) is removed."""
    paths = []
    for label in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == label]
        tasks = list(dict.fromkeys(r["task"] for r in mine))
        suffix = "__" + safe_name(f"{metadata['model']}__{label}")
        folder = out / "runs" / safe_name(f"{'+'.join(tasks)}{suffix}")
        for stale in (out / "runs").glob(f"*{suffix}"):  # safe names hold no glob characters
            if stale != folder and (stale / "config.yaml").is_file():
                shutil.rmtree(stale)
        folder.mkdir(parents=True, exist_ok=True)
        predictions = [{**s, "answers": json.dumps(s["answers"])} for s in sample_rows if s["policy"] == label]
        _write_csv(folder / "predictions.csv", predictions, PREDICTION_COLUMNS)
        (folder / "metrics.json").write_text(json.dumps(_metrics(mine), indent=1))
        config = {
            "policy": label,
            "policy_name": mine[0]["policy_name"],
            "policy_repr": mine[0]["policy_repr"],
            "budget": mine[0]["budget"],
            "tasks": tasks,
            "lengths": sorted({r["length"] for r in mine}),
            "samples": mine[0]["samples"],
            "chat": mine[0].get("chat"),
            **metadata,
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        paths += [folder / "predictions.csv", folder / "metrics.json", folder / "config.yaml"]
    return paths


def _write_text(path: Path, text: str) -> None:
    """Writes `path` whole or not at all (a run killed mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resume_from(out_dir: str | Path, metadata: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows, sample rows, earlier runs) of the results in `out_dir`, for a run of `metadata` to extend: refused
    in one line where the model, dtype or answer settings (`EvalConfig.answer_settings`) differ, since the
    table would then mix cells that are not comparable."""
    out = Path(out_dir)
    try:
        saved = json.loads((out / "results.json").read_text())
        sample_rows = json.loads((out / "samples.json").read_text())
    except FileNotFoundError:
        return [], [], []
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot resume from {out}: its results do not read ({err})") from err
    before = saved.get("metadata", {})
    for key in ("model", "dtype", "settings"):
        if before.get(key) != metadata.get(key):
            raise ValueError(
                f"cannot resume from {out}: its {key} is {before.get(key)!r}, this run's is {metadata.get(key)!r}"
            )
    earlier = before.get("earlier_runs", []) + [{k: before.get(k) for k in ("command", "commit", "date")}]
    cells = {(r["policy"], r["task"], r["length"]) for r in saved["rows"]}  # samples.json is written first
    return saved["rows"], [s for s in sample_rows if (s["policy"], s["task"], s["length"]) in cells], earlier


def check_same_policies(rows: list[dict], policies: dict[str, str]) -> None:
    """Refuses a policy label (in `policies`, label -> repr) that `rows` hold for another policy."""
    for r in rows:
        if r["policy"] in policies and policies[r["policy"]] != r["policy_repr"]:
            raise ValueError(
                f"{r['policy']} in the saved results is {r['policy_repr']}, in this run {policies[r['policy']]}; "
                "use another --out"
            )


def write_results(
    rows: list[dict], sample_rows: list[dict], out_dir: str | Path, metadata: dict, plots: bool = True
) -> list[Path]:
    """results.json ({"metadata", "rows"}), results.csv, samples.json, the per-run folders and the plots."""
    from kvjax.eval.plots import plot_accuracy_by_task, plot_accuracy_vs_compression, plot_heatmaps

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "samples.json", json.dumps(sample_rows, indent=1))
    _write_text(out / "results.json", json.dumps({"metadata": metadata, "rows": rows}, indent=1))
    _write_csv(out / "results.csv", rows, dict.fromkeys(k for r in rows for k in r))
    paths = [out / "results.json", out / "results.csv", out / "samples.json"]
    paths += write_run_folders(rows, sample_rows, out, metadata)
    if plots and rows:
        paths += plot_heatmaps(sample_rows, out)
        paths.append(plot_accuracy_vs_compression(rows, out / "accuracy_vs_compression.png", metadata))
        if len({r["task"] for r in rows}) > 1:
            paths.append(plot_accuracy_by_task(rows, out / "accuracy_by_task.png", metadata))
    return paths
