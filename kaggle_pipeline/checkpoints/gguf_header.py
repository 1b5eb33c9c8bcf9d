"""The header of a GGUF file, its metadata and its tensor index, read straight from the bytes.

gguf.GGUFReader makes a numpy view for every element of every metadata array: 4 s for Gemma 3's
262k-entry vocabulary, spent twice a run (the config, then the weights). The config needs a few
scalars, the weights only the tensor index, the tokenizer its own keys: here a string array is
built only when asked for, and skipped otherwise. Dequantizing stays with the `gguf` package.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from collections.abc import Collection
from pathlib import Path

import gguf
import numpy as np

# Metadata value types: fixed-size scalars by struct format; 8 is a string, 9 an array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9
VERSIONS = (2, 3)


class HeaderError(ValueError):
    """The file is not a GGUF, or its header is cut short or inconsistent."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, rows first (the file lists the fastest axis first)
    offset: int  # from the start of the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # string arrays not asked for are absent
    tensors: dict[str, TensorInfo]


def read_header(path: str | Path, string_arrays: Collection[str] = (), *,
                tensors: bool = True) -> Header:
    """The metadata (numeric arrays as numpy, the string arrays named in `string_arrays` as
    lists) and, with `tensors`, the tensor index. HeaderError naming the file when it is not a
    GGUF or its header is cut short or inconsistent."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise HeaderError(path, "not a GGUF file (no GGUF magic bytes)")
        try:
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
            if version not in VERSIONS:
                raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
            pos, metadata = 24, {}
            for _ in range(kv_count):
                key, pos = _string(blob, pos)
                (value_type,) = struct.unpack_from("<I", blob, pos)
                value, pos = _value(blob, pos + 4, value_type, key in string_arrays)
                if value is not None:
                    metadata[key] = value
            index = _tensor_index(blob, pos, tensor_count, metadata) if tensors else {}
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            raise HeaderError(path, f"corrupt or truncated GGUF header ({err})") from None
    return Header(metadata, index)


def _tensor_index(blob: mmap.mmap, pos: int, count: int, metadata: dict
                  ) -> dict[str, TensorInfo]:
    entries = []
    for _ in range(count):
        name, pos = _string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        raw_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, dims, gguf.GGMLQuantizationType(raw_type), offset))
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    data_start = -(-pos // alignment) * alignment
    index = {}
    for name, dims, qtype, offset in entries:
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if name in index:
            raise ValueError(f"tensor {name!r} is listed twice")
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name!r}: rows of {dims[0]} are not whole "
                             f"{qtype.name} blocks of {block}")
        nbytes = math.prod(dims) // block * block_bytes
        start = data_start + offset
        if start + nbytes > len(blob):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        index[name] = TensorInfo(name, qtype, tuple(reversed(dims)), start, nbytes)
    return index


def _string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise ValueError("a string runs past the end of the file")
    return blob[pos + 8 : end].decode("utf-8"), end


def _value(blob: mmap.mmap, pos: int, value_type: int, keep_strings: bool):
    """(value, next position); a string array not kept is skipped, and its value is None."""
    if value_type in _SCALAR:
        fmt = _SCALAR[value_type]
        (value,) = struct.unpack_from(fmt, blob, pos)
        if value_type == _FLOAT32:  # 1e-6 as written, not 9.999999974752427e-07
            value = float(str(np.float32(value)))
        return value, pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _string(blob, pos)
    if value_type != _ARRAY:
        raise ValueError(f"unknown metadata value type {value_type}")
    element_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if element_type in _SCALAR:
        dtype = np.dtype(_SCALAR[element_type])
        end = pos + count * dtype.itemsize
        if end > len(blob):
            raise ValueError("an array runs past the end of the file")
        return np.frombuffer(blob[pos:end], dtype=dtype), end
    if element_type != _STRING:
        raise ValueError(f"arrays of type {element_type} are not supported")
    strings = [] if keep_strings else None
    for _ in range(count):
        if keep_strings:
            value, pos = _string(blob, pos)
            strings.append(value)
        else:
            (length,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + length
    if pos > len(blob):
        raise ValueError("an array runs past the end of the file")
    return strings, pos
