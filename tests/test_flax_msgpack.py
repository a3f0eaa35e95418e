"""The original's checkpoint format without JAX: bytes equal to flax.serialization's, plain and
chunked, and what it restores equal to Flax's."""

import io

import numpy as np
import pytest
from flax import serialization

from kan_vit.flax import msgpack as flax_msgpack


def _mixed_tree():
    rng = np.random.default_rng(0)
    return {
        "model": {
            "b": rng.standard_normal((3, 4, 5)).astype(np.float32),
            "a": {"kernel": rng.standard_normal((7, 300)).astype(np.float32), "x": np.arange(5)},
            "scalar": np.float32(2.5),
            "zero_d": np.zeros((), np.float64),
        },
        "step": 12,
        "lr": 1e-3,
        "name": "run",
        "flag": True,
        "none": None,
    }


@pytest.mark.parametrize("chunk", [None, 256])
def test_writer_bytes_equal_flax(chunk, monkeypatch):
    tree = _mixed_tree()
    if chunk:
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk)  # (7, 300) f32 is chunked
    buf = io.BytesIO()
    flax_msgpack.dump(tree, buf, **({"max_chunk_size": chunk} if chunk else {}))
    flax_bytes = serialization.msgpack_serialize(tree)
    assert (b"__msgpack_chunked_array__" in flax_bytes) == bool(chunk)
    assert buf.getvalue() == flax_bytes
    restored = serialization.msgpack_restore(buf.getvalue())
    assert np.array_equal(restored["model"]["a"]["kernel"], tree["model"]["a"]["kernel"])
    assert restored["model"]["scalar"] == np.float32(2.5)


@pytest.mark.parametrize("chunk", [None, 100])
def test_reader_matches_flax_restore(chunk, monkeypatch):
    tree = _mixed_tree()
    if chunk:
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk)
    data = serialization.msgpack_serialize(tree)
    ours, theirs = flax_msgpack.restore(data), serialization.msgpack_restore(data)
    assert ours.keys() == theirs.keys()
    assert {k: ours[k] for k in ("step", "lr", "name", "flag", "none")} == {
        k: theirs[k] for k in ("step", "lr", "name", "flag", "none")
    }
    for key in ("b", "scalar", "zero_d"):
        assert type(ours["model"][key]) is type(theirs["model"][key])
        assert ours["model"][key].dtype == theirs["model"][key].dtype
        assert np.array_equal(ours["model"][key], theirs["model"][key])
    for key in ("kernel", "x"):
        assert ours["model"]["a"][key].dtype == theirs["model"]["a"][key].dtype
        assert ours["model"]["a"][key].shape == theirs["model"]["a"][key].shape
        assert np.array_equal(ours["model"]["a"][key], theirs["model"]["a"][key])


@pytest.mark.parametrize("data", [b"hello world", b"", b"\x81\xa1a\xc7\x03\x01abc"])
def test_reader_rejects_non_msgpack(data):
    with pytest.raises(flax_msgpack.FlaxMsgpackError):
        flax_msgpack.restore(data)
