"""Lazy, memory-mapped reading of .safetensors files: tensors are read one at a time, never pickled."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(file: str, name: str, entry) -> None:
    """One header entry: {"dtype": a known dtype, "shape": [n, ...], "data_offsets": [begin, end]}."""
    if not isinstance(entry, dict):
        raise ValueError(f"{file}: tensor {name!r} is described by a {type(entry).__name__}, not an object")
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"{file}: tensor {name!r} has no valid shape (a list of sizes); got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
        raise ValueError(f"{file}: tensor {name!r} has no valid data_offsets ([begin, end]); got {offsets!r}")
    if not 0 <= offsets[0] <= offsets[1]:
        raise ValueError(f"{file}: tensor {name!r} has data_offsets {offsets} out of order")


class SafetensorsFile:
    """Index of one file's tensors (name -> dtype, shape, byte range) over a read-only memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path.name}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"{self.path.name}: header length {header_len} exceeds the file size")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path.name}: corrupted safetensors header ({err})") from err
        if not isinstance(header, dict):
            raise ValueError(
                f"{self.path.name}: the safetensors header must be a JSON object; got a {type(header).__name__}"
            )
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            _check_entry(self.path.name, name, entry)
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
            if end - begin != expected or self._data_start + end > size:
                raise ValueError(f"{self.path.name}: tensor {name!r} is truncated or misdescribed")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only array view over the memory map (no copy until converted)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
