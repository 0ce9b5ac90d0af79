"""`kvjax convert HF_DIR OUT_DIR`: Hugging Face safetensors (or a GGUF file) -> a kvjax checkpoint, all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from checkpoints_convert.safetensors_file import SafetensorsFile
from checkpoints_convert.weight_map import hf_targets
from kvjax.checkpoint import save_checkpoint
from kvjax.config import read_hf_config
from kvjax.language_model import abstract_model
from kvjax.tokenizer import TOKENIZER_FILES

_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor at fault."""


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors shards, from the index json when there is one; refuses pickled weights."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ConversionError(f"{index.name} has no weight_map")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"shard {f.name} listed in {index.name} is missing")
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
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


def _storage_dtype(hf_dir: Path, dtype: str | None):
    if dtype is None:
        raw = json.loads((hf_dir / "config.json").read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if dtype not in _DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _nest(flat: dict[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def convert(hf_dir, out_dir, dtype: str | None = None, progress: bool = True) -> Path:
    """Converts shard by shard (each tensor memory-mapped, converted once, the source never copied);
    writes to a temporary directory renamed to `out_dir` only when everything checked out.
    A `.gguf` file instead of a directory goes to `gguf_checkpoint.convert_gguf`."""
    from checkpoints_convert.gguf_checkpoint import convert_gguf, is_gguf

    if is_gguf(hf_dir):
        return convert_gguf(hf_dir, out_dir, dtype=dtype, progress=progress)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists; refusing to overwrite it")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory")
    try:
        config = read_hf_config(hf_dir)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise ConversionError(str(err)) from err
    files = _weight_files(hf_dir)
    storage = _storage_dtype(hf_dir, dtype)
    expected = {tuple(path): variable.shape for path, variable in nnx.to_flat_state(abstract_model(config).params)}
    arrays: dict[tuple, np.ndarray] = {}
    bar = tqdm(
        total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="converting", disable=not progress
    )
    for file in files:
        try:
            shard = SafetensorsFile(file)
        except (ValueError, OSError) as err:
            raise ConversionError(str(err)) from err
        for name in shard.names():
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
                if path not in expected:
                    raise ConversionError(
                        f"unexpected tensor {name!r} in {file.name}: the config has no {'.'.join(map(str, path))}"
                    )
                if value.shape != expected[path]:
                    raise ConversionError(
                        f"tensor {name!r} in {file.name} has shape {shard.shape(name)}; the config implies "
                        f"{expected[path]} for {'.'.join(map(str, path))}"
                    )
                if path in arrays:
                    raise ConversionError(f"tensor {name!r} appears twice")
                arrays[path] = np.ascontiguousarray(value, dtype=storage)
        bar.update(file.stat().st_size)
    bar.close()
    missing = sorted(".".join(map(str, p)) for p in expected if p not in arrays)
    if missing:
        raise ConversionError(f"missing tensors for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    tokenizer_files = {name: hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()}
    return save_checkpoint(
        out_dir,
        config,
        _nest(arrays),
        tokenizer_files,
        metadata={
            "converted_from": str(hf_dir.absolute()),
            "hf_config": json.loads((hf_dir / "config.json").read_text()),
        },
    )
