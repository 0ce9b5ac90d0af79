"""The Colab notebook: committed clean for the v5e-1 TPU runtime, and executed top to bottom by nbclient in a
Jupyter kernel on this CPU, skipping only the cells tagged as needing the network or a TPU, with small settings
injected after its parameters cell (papermill's convention), checking that it produces what its text promises."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

NOTEBOOK = Path(__file__).parents[1] / "colab" / "kvjax_quickstart.ipynb"
SKIPPED = {"network", "tpu"}  # cells that need what CI does not have; every other cell runs
SMALL = dict(
    POLICIES="full,streaming",
    DTYPE="float32",
    LENGTHS=(512,),
    SAMPLES=2,
    TIMING=False,
    BENCH_LENGTHS=(512,),
    REPEATS=1,
    OUT="out",
)
# Run after the last cell, in the kernel: what the notebook's text promises.
CHECKS = """
full_bytes, full_text = one_prompt["full"]
assert sample.answers[0] in full_text, full_text  # the bundled model finds the needle with a full cache
assert all(b < full_bytes / 1.5 for label, (b, _) in one_prompt.items() if label != "full"), one_prompt
assert {(r["policy"], r["task"]) for r in rows} == {
    (p, t) for p in ("full", "streaming@256") for t in ("niah_single", "passkey")
}, rows
assert all(r["accuracy"] == 1.0 for r in rows if r["policy"] == "full"), rows
assert Lowering.parse("auto").platform == "reference"  # this CPU
"""


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _tags(cell) -> set[str]:
    return set(cell.metadata.get("tags", []))


def test_notebook_is_committed_clean(notebook):
    """Saved for Colab's v5e-1 TPU runtime, without outputs; the only tags are its one parameters cell and
    the cells that need the network (the install cell and the 3B model's download)."""
    nbformat.validate(notebook)
    assert notebook.metadata["accelerator"] == "TPU" and notebook.metadata["colab"]["gpuType"] == "V5E1"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    tags = [t for c in code for t in _tags(c)]
    assert tags.count("parameters") == 1 and set(tags) <= {"parameters", *SKIPPED}
    install = code[0]
    assert _tags(install) == {"network"} and "pip" in install.source
    assert ".whl" in install.source and "-e" in install.source  # from a wheel or from a checkout
    assert "jax[tpu]" in install.source and "jax[cuda12]" in install.source


def test_notebook_runs_top_to_bottom(notebook, tmp_path):
    nb = nbformat.from_dict(json.loads(json.dumps(notebook)))  # a copy
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code" and _tags(cell) & SKIPPED:
            continue
        cells.append(cell)
        if "parameters" in _tags(cell):
            namespace: dict = {}
            exec(cell.source, namespace)
            assert SMALL.keys() <= namespace.keys()  # the settings the test shrinks exist
            small = "\n".join(f"{k} = {v!r}" for k, v in SMALL.items())
            cells.append(nbformat.v4.new_code_cell(small, metadata={"tags": ["injected-parameters"]}))
    cells.append(nbformat.v4.new_code_cell(textwrap.dedent(CHECKS)))
    nb.cells = cells
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell and its traceback

    out = tmp_path / "out"
    for name in ("results.json", "results.csv", "accuracy_vs_compression.png", "bench.json", "bench.png"):
        assert (out / name).is_file(), name
    bench = json.loads((out / "bench.json").read_text())
    assert [r["policy"] for r in bench["rows"]] == ["full", "streaming@256"]
    assert bench["rows"][1]["kv_bytes"] < bench["rows"][0]["kv_bytes"]
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert 'attention_impl="auto" runs: reference' in printed
