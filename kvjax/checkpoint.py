"""kvjax checkpoints on disk: orbax parameters, the model config and the tokenizer, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.language_model import LanguageModel, abstract_model
from kvjax.sharding import param_shardings
from kvjax.tokenizer import Tokenizer

FORMAT = "kvjax-checkpoint-1"
BUNDLED_DIR = Path(__file__).parent / "bundled"


class CheckpointError(ValueError):
    """A path that is not a loadable kvjax checkpoint (missing, foreign or corrupted)."""


def bundled_models() -> list[str]:
    """Names of the models that ship inside the kvjax package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "kvjax.json").is_file())


def save_checkpoint(
    directory: Path,
    config: ModelConfig,
    params: dict,
    tokenizer_files: dict[str, Path] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Writes a checkpoint to a temporary sibling directory, then renames it into place.

    `params` is a pure dict (`nnx.to_pure_dict`) of arrays. Nothing is left at `directory` on failure.
    """
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; refusing to overwrite it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
        (staging / "config.json").write_text(config.to_json())
        if tokenizer_files:
            (staging / "tokenizer").mkdir()
            for name, source in tokenizer_files.items():
                shutil.copyfile(source, staging / "tokenizer" / name)
        dtype = str(jax.tree.leaves(params)[0].dtype)
        info = {"format": FORMAT, "dtype": dtype, **(metadata or {})}
        (staging / "kvjax.json").write_text(json.dumps(info, indent=2))
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A checkpoint directory from a path, the name of a bundled model or of a fetched one (`kvjax fetch`)."""
    from kvjax.fetch import REGISTRY, model_dir

    path = Path(path_or_name)
    if (path / "kvjax.json").is_file():
        return path
    if (BUNDLED_DIR / str(path_or_name) / "kvjax.json").is_file():
        return BUNDLED_DIR / str(path_or_name)
    if str(path_or_name) in REGISTRY:
        fetched = model_dir(str(path_or_name))
        if (fetched / "kvjax.json").is_file():
            return fetched
        raise CheckpointError(
            f"{path_or_name} is not fetched yet; run `kvjax fetch {path_or_name}` first "
            f"(it downloads and converts it once, into {fetched})"
        )
    if (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} looks like a Hugging Face checkpoint, not a kvjax one; convert it first with "
            f"`kvjax convert {path} OUT_DIR`"
        )
    bundled = ", ".join(bundled_models()) or "none"
    raise CheckpointError(f"no kvjax checkpoint at {path} and no bundled model of that name (bundled: {bundled})")


def load(path_or_name: str | os.PathLike, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None) -> LanguageModel:
    """Loads a converted (or trained) checkpoint directory, or a bundled model by name.

    With a `mesh` (`kvjax.sharding.make_mesh`), each device reads only its shard of every parameter,
    so a model larger than one accelerator's memory loads straight onto several.
    """
    directory = resolve(path_or_name)
    info = json.loads((directory / "kvjax.json").read_text())
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: unknown checkpoint format {info.get('format')!r}; expected {FORMAT}")
    try:
        config = ModelConfig.from_json((directory / "config.json").read_text())
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{directory}: unreadable config.json ({err})") from err
    shell = abstract_model(config, dtype)
    target = nnx.to_pure_dict(shell.params)
    # Every leaf names where it goes: without that, orbax falls back to the devices the checkpoint was
    # saved from, and a checkpoint written on CPU (the bundled model) then fails to load on a GPU.
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    else:
        shardings = param_shardings(mesh, target)
    target = jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target, shardings
    )
    try:
        restored = ocp.StandardCheckpointer().restore((directory / "params").absolute(), target)
    except Exception as err:  # orbax raises many types for truncated or mismatched data
        raise CheckpointError(f"{directory}: corrupted or incomplete parameters ({type(err).__name__}: {err})") from err
    params = shell.params
    nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: jnp.asarray(x, dtype), restored))
    tokenizer = Tokenizer(directory / "tokenizer") if (directory / "tokenizer" / "tokenizer.json").is_file() else None
    return LanguageModel(
        config=config, graphdef=shell.graphdef, params=params, tokenizer=tokenizer, name=directory.name, mesh=mesh
    )
