"""`kvjax convert HF_DIR OUT_DIR`: Hugging Face safetensors (or a GGUF file) -> a kvjax checkpoint, all or nothing."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from checkpoints_convert.safetensors_file import SafetensorsFile
from checkpoints_convert.weight_map import hf_shape, hf_targets
from kvjax.checkpoint import check_output_dir, save_checkpoint
from kvjax.config import config_from_hf, read_json
from kvjax.language_model import abstract_model
from kvjax.tokenizer import TOKENIZER_FILES, Tokenizer

_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor at fault."""


def _allowed_roots(hf_dir: Path) -> list[Path]:
    """Where the source's files may resolve to: the folder itself, and in a Hugging Face cache
    (models--ORG--NAME/snapshots/REVISION/FILE -> ../../blobs/HASH) the model's blobs/."""
    roots = [hf_dir.resolve()]
    for snapshot in (hf_dir.absolute(), hf_dir.resolve()):
        if snapshot.parent.name == "snapshots":
            roots.append((snapshot.parent.parent / "blobs").resolve())
    return roots


def _source_file(hf_dir: Path, name, what: str) -> Path:
    """`hf_dir / name` once it is sure to stay inside the source: `name` a relative path without '..', and
    the file, if a link, resolving inside `hf_dir` or its Hugging Face cache's blobs/ (never /etc/passwd)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConversionError(f"{what} {name!r} points outside {hf_dir}; refusing to read it")
    path = hf_dir / name
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in _allowed_roots(hf_dir)):
        raise ConversionError(
            f"{what} {name} is a link to {resolved}, outside {hf_dir} (and outside a Hugging Face cache's "
            "blobs/); refusing to read it"
        )
    return path


def _json(hf_dir: Path, name: str):
    try:
        return read_json(_source_file(hf_dir, name, "file"))
    except OSError as err:
        raise ConversionError(f"cannot read {hf_dir / name} ({err.strerror or err})") from None
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors shards, from the index json when there is one; refuses pickled weights."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        data = _json(hf_dir, index.name)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not weight_map or not isinstance(weight_map, dict):
            raise ConversionError(f"{index} has no weight_map (an object of tensor name -> shard file)")
        files = [_source_file(hf_dir, name, f"shard listed in {index.name}") for name in set(weight_map.values())]
        for f in sorted(files):
            if not f.is_file():
                raise ConversionError(f"shard {f.name} listed in {index.name} is missing")
        return sorted(files)
    files = [_source_file(hf_dir, p.name, "weight file") for p in sorted(hf_dir.glob("*.safetensors"))]
    if files:
        return files
    pickled = sorted(p.name for pattern in _PICKLED for p in hf_dir.glob(pattern))
    if pickled:
        raise ConversionError(
            f"{hf_dir} holds only pickled weights ({', '.join(pickled[:3])}); kvjax never unpickles "
            "(it can execute code). Re-save the model as safetensors "
            "(`model.save_pretrained(dir, safe_serialization=True)`) and convert that."
        )
    raise ConversionError(f"no *.safetensors weights found in {hf_dir}")


def _storage_dtype(hf_raw: dict, dtype: str | None):
    if dtype is None:
        dtype = hf_raw.get("dtype") or hf_raw.get("torch_dtype") or "bfloat16"
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _tokenizer_files(hf_dir: Path) -> dict[str, Path]:
    """The tokenizer files to copy, each checked to stay inside the source and to load (a garbage
    tokenizer.json or chat template fails here, not later when the converted model is used)."""
    files = {
        name: _source_file(hf_dir, name, "tokenizer file")
        for name in TOKENIZER_FILES
        if (hf_dir / name).is_file() or (hf_dir / name).is_symlink()
    }
    for path in files.values():
        if not path.is_file():
            raise ConversionError(f"tokenizer file {path} is a broken link")
    if "tokenizer.json" in files:
        with tempfile.TemporaryDirectory(prefix="kvjax-tokenizer-check-") as tmp:  # the files as they will be copied
            for name, path in files.items():
                shutil.copyfile(path, Path(tmp) / name)
            try:
                Tokenizer(Path(tmp))
            except (ValueError, OSError) as err:
                raise ConversionError(str(err).replace(tmp, str(hf_dir))) from None
    return files


def _nest(flat: dict[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _convert_shard(file: Path, config, expected: dict, storage, arrays: dict) -> None:
    """Converts one shard's tensors into `arrays`, naming the file and tensor at fault."""
    try:
        shard = SafetensorsFile(file)
    except (ValueError, OSError) as err:
        raise ConversionError(str(err)) from err
    for name in shard.names():
        want = hf_shape(config, name)
        if want is not None and shard.shape(name) != want:
            raise ConversionError(
                f"tensor {name!r} in {file.name} has shape {shard.shape(name)}; the config implies {want}"
            )
        try:
            targets = list(hf_targets(config, name, shard.read(name)))
        except KeyError:
            raise ConversionError(
                f"unexpected tensor {name!r} in {file.name}: no {config.family} parameter takes it"
            ) from None
        except ValueError as err:
            raise ConversionError(
                f"tensor {name!r} in {file.name} has shape {shard.shape(name)}, which does not fit the config ({err})"
            ) from None
        for path, value in targets:
            where = ".".join(map(str, path))
            if path not in expected:
                raise ConversionError(f"unexpected tensor {name!r} in {file.name}: the config has no {where}")
            if value.shape != expected[path]:
                raise ConversionError(
                    f"tensor {name!r} in {file.name} has shape {shard.shape(name)}, which makes {where} "
                    f"{value.shape}; the config implies {expected[path]} there"
                )
            if path in arrays:
                raise ConversionError(f"tensor {name!r} appears twice")
            arrays[path] = np.ascontiguousarray(value, dtype=storage)


def convert(hf_dir, out_dir, dtype: str | None = None, progress: bool = True) -> Path:
    """Converts shard by shard (each tensor memory-mapped, converted once, the source never copied);
    writes to a temporary directory renamed to `out_dir` only when everything checked out.
    A `.gguf` file instead of a directory goes to `gguf_checkpoint.convert_gguf`."""
    from checkpoints_convert.gguf_checkpoint import convert_gguf, is_gguf

    if is_gguf(hf_dir):
        return convert_gguf(hf_dir, out_dir, dtype=dtype, progress=progress)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    try:
        check_output_dir(out_dir)  # before any weight is read
    except OSError as err:
        raise ConversionError(str(err)) from None
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory")
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir / 'config.json'} not found: not a Hugging Face checkpoint directory")
    hf_raw = _json(hf_dir, "config.json")
    try:
        config = config_from_hf(hf_raw)
    except (ValueError, KeyError) as err:
        raise ConversionError(str(err)) from err
    files = _weight_files(hf_dir)
    storage = _storage_dtype(hf_raw, dtype)
    tokenizer_files = _tokenizer_files(hf_dir)
    expected = {tuple(path): variable.shape for path, variable in nnx.to_flat_state(abstract_model(config).params)}
    arrays: dict[tuple, np.ndarray] = {}
    bar = tqdm(
        total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="converting", disable=not progress
    )
    try:  # the bar closed before any error propagates: its last redraw must not follow the message
        for file in files:
            _convert_shard(file, config, expected, storage, arrays)
            bar.update(file.stat().st_size)
    finally:
        bar.close()
    missing = sorted(".".join(map(str, p)) for p in expected if p not in arrays)
    if missing:
        raise ConversionError(f"missing tensors for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return save_checkpoint(
        out_dir,
        config,
        _nest(arrays),
        tokenizer_files,
        metadata={
            "converted_from": str(hf_dir.absolute()),
            "hf_config": hf_raw,
        },
    )
