"""A safetensors file read through one open: its ``__metadata__``, and per tensor its dtype, shape and bytes.

safetensors' own reader (``safe_open``) opens the path twice, once for the header and once for the data
(``torch.UntypedStorage.from_file``): a file renamed over the path in between pairs one file's header with the
other's data. Plans are replaced that way by every `Plan.save`, so plans are read here: the file is read whole
through one handle and its layout checked before anything is built from it. Format:
https://huggingface.co/docs/safetensors (8-byte little-endian header length, a JSON header, the data section).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20
"""safetensors' own bound on the length of its JSON header."""


class ContainerError(ValueError):
    """The file is not a well-formed safetensors file (the message says what is wrong)."""


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@dataclass
class Container:
    """A safetensors file read whole: ``metadata`` and, per tensor, (dtype, shape, begin, end) in ``data``."""

    metadata: dict[str, str]
    entries: dict[str, tuple[str, list[int], int, int]]
    data: bytearray

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor ``key`` as ``dtype`` (its safetensors dtype must have that item size), sharing ``data``."""
        _, shape, begin, end = self.entries[key]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ContainerError(f"tensor {key!r} has {end - begin} bytes, not {shape} of {dtype}")
        return torch.frombuffer(self.data, dtype=dtype, count=math.prod(shape), offset=begin).view(shape)


def _read_whole(path: Union[str, Path]) -> bytearray:
    with open(path, "rb") as handle:
        data = bytearray(os.fstat(handle.fileno()).st_size)
        view, filled = memoryview(data), 0
        while filled < len(data):
            count = handle.readinto(view[filled:])
            if not count:
                break
            filled += count
        view.release()
    del data[filled:]  # a file truncated while it was read
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ContainerError(f"header names {key!r} twice")
        seen[key] = value
    return seen


def read_container(path: Union[str, Path]) -> Container:
    """Read ``path`` through one open and check its layout: header length inside the file, a UTF-8 JSON object,
    string metadata, every tensor's dtype known, shape a list of sizes, byte range inside the data section and of
    its dtype and shape's size, the ranges tiling the data section. Raises ContainerError."""
    data = _read_whole(path)
    if len(data) < 8:
        raise ContainerError(f"{len(data)} bytes, fewer than the 8-byte header length")
    length = int.from_bytes(data[:8], "little")
    if length > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ContainerError(f"header length {length} exceeds the file's {len(data) - 8} bytes after it")
    try:
        header = json.loads(bytes(data[8:8 + length]).decode("utf-8"), object_pairs_hook=_unique_keys)
    except ContainerError:
        raise
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, an integer too long, nesting too deep
        raise ContainerError(f"header is not UTF-8 JSON ({type(error).__name__}: {error})") from error
    if not isinstance(header, dict):
        raise ContainerError(f"header is {_short(header)}, not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ContainerError(f"__metadata__ must map names to strings, got {_short(metadata)}")
    base, size = 8 + length, len(data) - 8 - length
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or sorted(info) != ["data_offsets", "dtype", "shape"]:
            raise ContainerError(f"tensor {key!r} is described by {_short(info)}, not dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
            raise ContainerError(f"tensor {key!r} has unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ContainerError(f"tensor {key!r} has shape {_short(shape)}, not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size):
            raise ContainerError(f"tensor {key!r} has data_offsets {_short(offsets)} outside the {size} data bytes")
        needed = math.prod(shape) * ITEM_SIZES[dtype]
        if offsets[1] - offsets[0] != needed:
            raise ContainerError(f"tensor {key!r} spans {offsets[1] - offsets[0]} bytes, {dtype} of shape {shape} "
                                 f"needs {needed}")
        entries[key] = (dtype, shape, base + offsets[0], base + offsets[1])
    end = base
    for begin, stop in sorted((begin, stop) for _, _, begin, stop in entries.values()):
        if begin != end:
            raise ContainerError("tensor data overlaps or leaves a gap")
        end = stop
    if end != len(data):
        raise ContainerError(f"{len(data) - end} bytes after the last tensor")
    return Container(metadata, entries, data)
