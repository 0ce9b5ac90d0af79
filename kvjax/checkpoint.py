"""kvjax checkpoints on disk: orbax parameters, the model config and the tokenizer, written atomically."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from kvjax.config import ModelConfig, read_json
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


def check_output_dir(directory: str | os.PathLike) -> Path:
    """`directory` made absolute, after checking it does not exist yet and could be created: called before
    any long work (reading weights, training), so that a run never fails only at its end. Staging folders
    that an interrupted earlier write to it left behind are removed here (and the removal reported)."""
    directory = Path(directory).absolute()
    if directory.exists() or directory.is_symlink():
        raise FileExistsError(f"{directory} already exists; refusing to overwrite it")
    existing = directory.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {directory}: {existing} is not writable")
    if directory.parent.is_dir():
        _remove_stale_staging(directory)
    return directory


_STAGING = ".{name}.partial-"  # + host-pid-random: where a checkpoint is written before its rename


def _remove_stale_staging(directory: Path) -> None:
    """Removes the staging folders a killed write to `directory` left behind (as large as a checkpoint, and
    hidden), saying so; a staging folder of a process still running on this host is left alone, and so is
    one from another host (it may be running there)."""
    prefix = _STAGING.format(name=directory.name)
    host = socket.gethostname()
    for path in directory.parent.glob(prefix + "*"):
        if path.is_symlink() or not path.is_dir():
            continue
        parts = path.name[len(prefix) :].rsplit("-", 2)  # host, pid, random; older kvjax: random only
        if len(parts) == 3 and parts[1].isdigit() and (parts[0] != host or _running(int(parts[1]))):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}: the staging folder of an interrupted write ({size / 2**20:.1f} MiB)", file=sys.stderr)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
    directory = check_output_dir(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    name = f"{_STAGING.format(name=directory.name)}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    staging = directory.parent / name
    staging.mkdir()  # under the user's umask, as the renamed checkpoint will be (mkdtemp would make it 0700)
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
    try:
        info = read_json(directory / "kvjax.json")
    except (OSError, ValueError) as err:
        raise CheckpointError(str(err)) from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        info = info if isinstance(info, dict) else {}
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
