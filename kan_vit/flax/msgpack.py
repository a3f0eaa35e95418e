"""Flax's msgpack checkpoint format, read and written with `msgpack` + `numpy` only (no JAX).

`flax.serialization.msgpack_serialize(tree)` encodes a nested dict whose leaves are
  * ndarrays: msgpack ExtType 1, payload = msgpack of (shape, dtype name, raw C-order bytes)
  * numpy scalars: ExtType 3, payload as for a 0-d array
  * ndarrays larger than `MAX_CHUNK_SIZE` bytes: a dict
    {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": arr, ...}}
    of flat C-order chunks (msgpack caps one object at 2**31 - 1 bytes)
  * Python primitives as plain msgpack values.
`dump` writes exactly the bytes Flax writes (`save`: to a file, atomically), streaming each array's buffer to the file;
`restore` returns arrays that view the decoded payloads instead of copying them.
"""

from __future__ import annotations

import math
import struct
from typing import Any, BinaryIO

import msgpack
import numpy as np

from kan_vit.utils.atomic_files import atomic_outputs

__all__ = ["MAX_CHUNK_SIZE", "FlaxMsgpackError", "dump", "load", "restore", "save"]

# Flax's threshold and chunk size (bytes): below msgpack's 2**31 - 1 limit with margin.
MAX_CHUNK_SIZE = 2**30

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
_BIN_LENGTH_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_HEADER_PEEK = 512  # bytes of an array payload that hold (shape, dtype) for any sane rank


class FlaxMsgpackError(ValueError):
    """The bytes are not a Flax msgpack checkpoint (or use a feature this reader lacks)."""


def _array_from_payload(data: bytes) -> np.ndarray:
    """Decode (shape, dtype, buffer) without copying the buffer: the array views `data`."""
    header = msgpack.Unpacker(raw=False)
    header.feed(data[:_HEADER_PEEK])
    try:
        if header.read_array_header() != 3:
            raise ValueError("not a (shape, dtype, bytes) triple")
        shape = tuple(header.unpack())
        dtype_name = header.unpack()
        pos = header.tell()
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise FlaxMsgpackError(f"corrupt array payload ({e})") from None
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        raise FlaxMsgpackError(f"unsupported array dtype {dtype_name!r}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    width = _BIN_LENGTH_WIDTH.get(data[pos]) if pos < len(data) else None
    stored = int.from_bytes(data[pos + 1 : pos + 1 + width], "big") if width else -1
    if stored != nbytes or pos + 1 + width + nbytes != len(data):
        raise FlaxMsgpackError(f"corrupt array payload: {shape} {dtype} does not match its byte count")
    return np.frombuffer(data, dtype, count=math.prod(shape), offset=len(data) - nbytes).reshape(shape)


def _ext_hook(code: int, data: bytes):
    if code == _EXT_NDARRAY:
        return _array_from_payload(data)
    if code == _EXT_NPSCALAR:
        return _array_from_payload(data)[()]
    raise FlaxMsgpackError(f"unsupported msgpack extension type {code}")


def _unchunk(tree):
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED):
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _unchunk(value) for key, value in tree.items()}


def restore(data: bytes) -> Any:
    """The tree `flax.serialization.msgpack_restore(data)` returns (arrays are read-only views)."""
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except FlaxMsgpackError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise FlaxMsgpackError(f"not a msgpack file ({e})") from None
    try:
        return _unchunk(tree)
    except (KeyError, TypeError, ValueError) as e:
        raise FlaxMsgpackError(f"corrupt chunked array ({e})") from None


def load(path) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    return restore(data)


def _ext_header(code: int, length: int) -> bytes:
    if length in _FIXEXT:
        return bytes((_FIXEXT[length], code))
    if length < 2**8:
        return struct.pack(">BBb", 0xC7, length, code)
    if length < 2**16:
        return struct.pack(">BHb", 0xC8, length, code)
    return struct.pack(">BIb", 0xC9, length, code)


def _bin_header(length: int) -> bytes:
    if length < 2**8:
        return struct.pack(">BB", 0xC4, length)
    if length < 2**16:
        return struct.pack(">BH", 0xC5, length)
    return struct.pack(">BI", 0xC6, length)


def _write_array(fp: BinaryIO, packer: msgpack.Packer, arr: np.ndarray, code: int) -> None:
    arr = np.asarray(arr, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise TypeError(f"cannot serialize arrays of dtype {arr.dtype}")
    prefix = (
        packer.pack_array_header(3)
        + packer.pack(list(arr.shape))
        + packer.pack(arr.dtype.name)
        + _bin_header(arr.nbytes)
    )
    fp.write(_ext_header(code, len(prefix) + arr.nbytes))
    fp.write(prefix)
    fp.write(arr.reshape(-1).view(np.uint8).data)  # the buffer itself, no copy


def _write_map(fp: BinaryIO, packer: msgpack.Packer, items: list, max_chunk_size: float) -> None:
    fp.write(packer.pack_map_header(len(items)))
    for key, value in items:
        fp.write(packer.pack(key))
        _write(fp, packer, value, max_chunk_size)


def _write(fp: BinaryIO, packer: msgpack.Packer, node, max_chunk_size: float) -> None:
    if isinstance(node, dict):
        _write_map(fp, packer, sorted(node.items()), max_chunk_size)  # Flax's tree_map copy sorts keys
    elif isinstance(node, np.ndarray):
        if node.nbytes > max_chunk_size:
            # Flax inserts the chunk dicts after sorting, so they keep insertion order.
            flat = node.reshape(-1)
            step = max(1, int(max_chunk_size / node.dtype.itemsize))
            chunks = [(str(i), flat[s : s + step]) for i, s in enumerate(range(0, flat.size, step))]
            shape = [(str(i), d) for i, d in enumerate(node.shape)]
            fp.write(packer.pack_map_header(3))
            fp.write(packer.pack(_CHUNKED) + packer.pack(True))
            fp.write(packer.pack("shape"))
            _write_map(fp, packer, shape, max_chunk_size)
            fp.write(packer.pack("chunks"))
            _write_map(fp, packer, chunks, math.inf)
        else:
            _write_array(fp, packer, node, _EXT_NDARRAY)
    elif isinstance(node, np.generic):
        _write_array(fp, packer, np.asarray(node), _EXT_NPSCALAR)
    elif node is None or isinstance(node, (bool, int, float, str, bytes)):
        fp.write(packer.pack(node))
    else:
        raise TypeError(f"cannot serialize a {type(node).__name__} in a Flax msgpack tree")


def dump(tree, fp: BinaryIO, *, max_chunk_size: int | None = None) -> None:
    """Write the bytes of `flax.serialization.msgpack_serialize(tree)` to the binary file `fp`.

    Arrays over `max_chunk_size` bytes (default: the module's `MAX_CHUNK_SIZE`) are chunked.
    """
    chunk = MAX_CHUNK_SIZE if max_chunk_size is None else max_chunk_size
    _write(fp, msgpack.Packer(use_bin_type=True), tree, chunk)


def save(tree, path) -> None:
    """Write `tree` to `path` atomically: a crash leaves the previous file intact."""
    with atomic_outputs(path) as (tmp,):
        with open(tmp, "wb") as f:
            dump(tree, f)
