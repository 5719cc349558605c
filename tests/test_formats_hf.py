"""The HF safetensors reader: header checks at least as strict as safetensors itself."""

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from relex.errors import RelexError
from relex.formats import open_reader
from relex.formats.hf import read_header


def _file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(4, 8, generator=g), "b": torch.randn(8, generator=g),
               "c": torch.randn(3, 5, generator=g).to(torch.bfloat16),
               "d": torch.arange(6, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _mutations(raw: bytes, rng: random.Random):
    """Corruptions of the header a damaged download or a buggy writer produces."""
    header, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(120):
        h = json.loads(json.dumps(header))
        d = data
        kind = rng.choice(["offset", "swap", "overlap", "shape", "dtype", "truncate", "extend",
                           "flip"])
        name = rng.choice(names)
        if kind == "offset":
            i = rng.randrange(2)
            h[name]["data_offsets"][i] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        elif kind == "swap":  # two same-size tensors pointing at each other's bytes
            other = rng.choice(names)
            h[name]["data_offsets"] = list(header[other]["data_offsets"])
        elif kind == "overlap":
            b, e = h[name]["data_offsets"]
            h[name]["data_offsets"] = [max(0, b - 4), e - 4]
        elif kind == "shape":
            h[name]["shape"] = [s + rng.choice([-1, 1]) for s in h[name]["shape"]] or [2]
        elif kind == "dtype":
            h[name]["dtype"] = rng.choice(["F16", "F64", "I32", "U8", "XX"])
        elif kind == "truncate":
            d = data[: rng.randrange(len(data))]
        elif kind == "extend":
            d = data + b"\0" * rng.choice([1, 8, 64])
        else:
            text = bytearray(json.dumps(h).encode())
            pos = rng.randrange(len(text))
            text[pos] = rng.randrange(32, 127)
            yield bytes(struct.pack("<Q", len(text)) + text + d)
            continue
        yield _join(h, d)


def test_header_parity_with_safetensors(tmp_path):
    """relex accepts a corrupted file only when safetensors does, and then reads the same."""
    path, _ = _file(tmp_path)
    raw = path.read_bytes()
    rng = random.Random(0)
    cases = agree = 0
    for i, blob in enumerate(_mutations(raw, rng)):
        f = tmp_path / f"m{i}.safetensors"
        f.write_bytes(blob)
        try:
            with safe_open(str(f), "pt") as sf:
                theirs = {k: sf.get_tensor(k) for k in sf.keys()}
        except Exception:  # noqa: BLE001 - any refusal counts
            theirs = None
        try:
            ours = read_header(f)[0]
        except RelexError as e:
            assert str(f) in str(e)
            ours = None
        cases += 1
        if theirs is None:
            assert ours is None, f"case {i}: relex accepted a file safetensors rejects"
        elif ours is not None:
            agree += 1
            assert set(ours) == set(theirs)
    assert cases == 120 and agree < cases  # the corruptions did hit


def test_overlapping_offsets_are_refused(tmp_path):
    path, _ = _file(tmp_path)
    header, data = _split(path.read_bytes())
    header["b"]["data_offsets"] = list(header["a"]["data_offsets"][:1]) + [
        header["a"]["data_offsets"][0] + 32]
    path.write_bytes(_join(header, data))
    with pytest.raises(RelexError, match="overlaps|gap|bytes after"):
        read_header(path)


def test_reader_reads_ranges(tmp_path):
    path, tensors = _file(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with open_reader(tmp_path) as r:
        assert r.format == "hf"
        assert {n: m.shape for n, m in r.tensors.items()} == {
            n: tuple(t.shape) for n, t in tensors.items()}
        for name, t in tensors.items():
            flat = t.reshape(-1)
            assert torch.equal(r.read(name, 0, flat.numel()), flat)
            assert torch.equal(r.read(name, 1, 3), flat[1:3])
            r.release(name, 0, flat.numel())
        assert r.config == {}
