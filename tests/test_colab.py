"""The Colab notebook: committed clean, and every cell that needs no Colab runtime, download or big
model runs top to bottom on this CPU (with small settings) and produces what its text promises."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

NOTEBOOK = Path(__file__).parents[1] / "colab" / "kvjax_quickstart.ipynb"


@pytest.fixture(scope="module")
def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def test_notebook_is_committed_clean(notebook):
    assert notebook["nbformat"] == 4 and notebook["metadata"]["accelerator"] == "TPU"
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    tags = [t for c in code for t in c["metadata"].get("tags", [])]
    assert tags.count("parameters") == 1 and "colab-only" in tags


def test_notebook_runs_on_cpu(notebook, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    small = dict(
        POLICIES="full,streaming",
        LENGTHS=(512,),
        SAMPLES=2,
        TIMING=False,
        BENCH_LENGTHS=(512,),
        REPEATS=1,
        OUT=str(tmp_path / "out"),
    )
    namespace: dict = {}
    for i, cell in enumerate(notebook["cells"]):
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or "colab-only" in tags:
            continue
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {i}", "exec"), namespace)
        if "parameters" in tags:
            assert small.keys() <= namespace.keys()  # the settings the text documents exist
            namespace.update(small)
    one_prompt = namespace["one_prompt"]
    full_bytes, full_text = one_prompt["full"]
    assert namespace["sample"].answers[0] in full_text  # the bundled model finds the needle with a full cache
    assert all(b < full_bytes / 1.5 for label, (b, _) in one_prompt.items() if label != "full")
    rows = namespace["rows"]
    assert {(r["policy"], r["task"]) for r in rows} == {
        (p, t) for p in ("full", "streaming@256") for t in ("niah_single", "passkey")
    }
    assert all(r["accuracy"] == 1.0 for r in rows if r["policy"] == "full")
    out = tmp_path / "out"
    for name in ("results.json", "results.csv", "accuracy_vs_compression.png", "bench.json", "bench.png"):
        assert (out / name).is_file(), name
    bench = json.loads((out / "bench.json").read_text())
    assert [r["policy"] for r in bench["rows"]] == ["full", "streaming@256"]
    assert bench["rows"][1]["kv_bytes"] < bench["rows"][0]["kv_bytes"]
