"""Damaged and hostile torch-pickle checkpoints: one error line, never a hang, a traceback, a
skipped step or silently used bytes.

The fixture writes a 3-step trajectory of a tiny Qwen2 with real FSDP2 (`fully_shard` on a
2-process gloo group on CPU) twice: verl rank files (`torch.save(model.state_dict())` per rank)
and accelerate's DCP layout (`torch.distributed.checkpoint.save`). Targeted tests cover each
damage that was once let through; the seeded fuzz mutates those files (bit flips anywhere and in
the zip records, truncation, shifted local headers, names swapped in the central directory,
pickle bytes with their CRC-32 rewritten, memo bombs) and requires for every mutation: exit
status 2 with one `relex: error:` line naming the damaged file (or its directory), or exit 0
with outputs identical to the undamaged run's; inputs untouched, nothing written, seconds each.
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import random
import re
import shutil
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import load_dir
from safetensors.torch import load_file
from test_errors import tree_digest
from test_formats_torch import _hf_run, _model, _rezip

from relex.cli import main
from relex.errors import RelexError

WORLD = 2
STEPS = (2, 4, 6)


def _worker(rank: int, root: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    root = Path(root)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank,
                            world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
        model = _model()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for step in STEPS:
            full = load_file(str(root / "hf" / f"global_step_{step}/actor/huggingface"
                                 / "model.safetensors"))
            model.load_state_dict({k: distribute_tensor(v, mesh, [Shard(0)])
                                   for k, v in full.items()})
            actor = root / "verl" / f"global_step_{step}" / "actor"
            torch.save(model.state_dict(), actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
            dcp.save({"model": model.state_dict()},
                     checkpoint_id=root / "dcp" / f"checkpoint-{step}" / "pytorch_model_fsdp_0")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """root with base/, verl/ and dcp/ runs, and out-verl/, out-dcp/ made from them."""
    root = tmp_path_factory.mktemp("damage")
    _hf_run(root)
    for step in STEPS:
        actor = root / "verl" / f"global_step_{step}" / "actor"
        (actor / "huggingface").mkdir(parents=True)
        shutil.copy(root / "base" / "config.json", actor / "huggingface")
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2,
                                                            "world_size": WORLD}))
        (root / "dcp" / f"checkpoint-{step}").mkdir(parents=True)
        shutil.copy(root / "base" / "config.json", root / "dcp" / f"checkpoint-{step}")
    torch.multiprocessing.start_processes(_worker, args=(str(root),), nprocs=WORLD, join=True,
                                          start_method="fork")
    for kind in ("verl", "dcp"):
        assert main(_args(root / kind, root / "base", root / f"out-{kind}")) == 0
    return root


def _args(run, base, out, *extra):
    return [str(x) for x in ("extrapolate", run, "--base", base, "--target", "30", "--output",
                             out, "-q", *extra)]


@pytest.fixture
def runs(clean, tmp_path):
    """A private copy of the clean runs (tests damage it)."""
    for kind in ("verl", "dcp"):
        shutil.copytree(clean / kind, tmp_path / kind)
    return tmp_path


def _rank(root, step=4, rank=1) -> Path:
    actor = root / "verl" / f"global_step_{step}" / "actor"
    return actor / f"model_world_size_{WORLD}_rank_{rank}.pt"


def _dcp(root, step=4) -> Path:
    return root / "dcp" / f"checkpoint-{step}" / "pytorch_model_fsdp_0"


def _outcome(capsys, clean, root, kind: str, *extra, same: bool = True) -> tuple[int, str]:
    """Run relex on root/kind; check the contract; (exit status, stderr). same: an accepted
    input must give the undamaged run's outputs."""
    out = root / "out"
    before = tree_digest(root / kind)
    # a hang fails the run instead of blocking it
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)
    started = time.perf_counter()
    try:
        code = main(_args(root / kind, clean / "base", out, *extra))
    finally:
        faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert seconds < 30, (seconds, err)
    assert tree_digest(root / kind) == before, "inputs were modified"
    if code == 0:
        a, b = load_dir(out / "step-30"), load_dir(clean / f"out-{kind}" / "step-30")
        _outcome.same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert _outcome.same or not same, "damaged input accepted with different outputs"
        shutil.rmtree(out)
    else:
        assert code == 2, err
        lines = [x for x in err.splitlines() if not x.startswith("relex: warning:")]
        assert len(lines) == 1 and lines[0].startswith("relex: error: "), err
        assert not out.exists() and not any(p.name.startswith(".out") for p in root.iterdir())
    return code, err


def _refused(capsys, clean, root, kind, pattern, *extra) -> str:
    code, err = _outcome(capsys, clean, root, kind, *extra)
    assert code == 2 and re.search(pattern, err), err
    return err


# --------------------------------------------------------------------- zip structure helpers
def _archives(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of each torch.save archive in raw (a rank file: one; a .distcp: one per
    chunk), found by their end-of-central-directory records."""
    out, start = [], 0
    for m in _find(raw, b"PK\x05\x06"):
        end = m + 22 + struct.unpack_from("<H", raw, m + 20)[0]
        out.append((start, end))
        start = end
    return out


def _find(raw: bytes, sig: bytes) -> list[int]:
    out, i = [], raw.find(sig)
    while i >= 0:
        out.append(i)
        i = raw.find(sig, i + 1)
    return out


def _members(raw: bytes, start: int, end: int) -> dict[str, dict]:
    """Each member of the archive at raw[start:end]: its local header, data and central entry
    offsets (absolute)."""
    zf = zipfile.ZipFile(__import__("io").BytesIO(raw[start:end]))
    central = {}
    for c in _find(raw[start:end], b"PK\x01\x02"):
        n = struct.unpack_from("<H", raw, start + c + 28)[0]
        central[raw[start + c + 46: start + c + 46 + n].decode()] = start + c
    out = {}
    for info in zf.infolist():
        local = start + info.header_offset
        n, e = struct.unpack_from("<HH", raw, local + 26)
        out[info.filename] = {"local": local, "data": local + 30 + n + e,
                              "size": info.file_size, "central": central[info.filename]}
    return out


def _set_crc(raw: bytearray, m: dict) -> None:
    """Rewrite a member's CRC-32 (data descriptor and central directory) to match its data."""
    crc = zlib.crc32(raw[m["data"]: m["data"] + m["size"]])
    desc = m["data"] + m["size"]
    struct.pack_into("<I", raw, desc + 4 if raw[desc: desc + 4] == b"PK\x07\x08" else desc, crc)
    struct.pack_into("<I", raw, m["central"] + 16, crc)


def _bomb(levels: int = 48, memo: int = 5000) -> bytes:
    """Pickle opcodes leaving one tuple of 2**levels leaves on the stack, in ~16 bytes a level
    (each level is a pair of the previous one, named twice through the memo)."""
    ops = b")r" + struct.pack("<I", memo)
    for i in range(levels):
        get = b"j" + struct.pack("<I", memo + i)
        ops += b"0" + get + get + b"\x86r" + struct.pack("<I", memo + i + 1)  # 0: POP
    return ops


def _data_pkl(file: Path) -> tuple[str, bytes]:
    with zipfile.ZipFile(file) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return name, z.read(name)


# --------------------------------------------------------------------- hangs
def test_memo_bomb_in_shard_dim(capsys, clean, runs):
    """Shard(dim=<2**48 leaves>): refused at once, not repr'ed forever."""
    f = _rank(runs)
    _, pkl = _data_pkl(f)
    m = re.search(rb"X\x03\x00\x00\x00dim(?:q.)?(K.)", pkl, re.S)  # 'dim': 0
    pkl = pkl[:m.start(1)] + _bomb() + pkl[m.end(1):]
    _rezip(f, f.with_suffix(".tmp"), {"/data.pkl": pkl})
    f.with_suffix(".tmp").replace(f)
    _refused(capsys, clean, runs, "verl", rf"{f}: the pickle unfolds into more than \d+ objects")


def test_memo_bomb_in_persistent_id(tmp_path):
    from relex.formats.torchzip import load
    f = tmp_path / "pid.pt"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02(X\x07\x00\x00\x00storage" + _bomb()
                   + b"tQ.")
        z.writestr("archive/byteorder", "little")
    started = time.perf_counter()
    with pytest.raises(RelexError, match=r"pid\.pt: corrupt pickle in data\.pkl "
                                         r"\(UnpicklingError: bad storage record") as e:
        load(f)
    assert time.perf_counter() - started < 5 and len(str(e.value)) < 600


def test_self_containing_pickle_is_refused():
    """A list that holds itself (through the memo) would send any walk round forever."""
    from relex.formats.unpickler import restricted_loads
    with pytest.raises(RelexError, match=r"loop\.pkl: the pickle contains itself"):
        restricted_loads(b"\x80\x02]q\x00h\x00a.", "loop.pkl")
    assert restricted_loads(b"\x80\x02]q\x00(K\x01K\x02e.", "ok.pkl") == [1, 2]


def test_memo_bomb_in_transform_descriptors(capsys, clean, runs):
    md_file = _dcp(runs) / ".metadata"
    md = pickle.loads(md_file.read_bytes())  # our own file: trusted here
    t = ()
    for _ in range(48):
        t = (t, t)
    next(iter(md.storage_data.values())).transform_descriptors = t
    md_file.write_bytes(pickle.dumps(md))
    _refused(capsys, clean, runs, "dcp", rf"{md_file}: the pickle unfolds into more than")


def test_real_pickles_stay_below_one_node_per_byte(clean, monkeypatch):
    """The bound on unpickled objects (unpickler.NODES_PER_BYTE = 8) has room: real rank files
    and DCP metadata load with 1 node per byte and no floor."""
    from relex.formats import open_reader, unpickler
    monkeypatch.setattr(unpickler, "NODES_PER_BYTE", 1)
    monkeypatch.setattr(unpickler, "MIN_NODES", 0)
    for path in (clean / "verl" / "global_step_2" / "actor", _dcp(clean, 2)):
        with open_reader(path) as r:
            assert len(r.tensors) > 10


# --------------------------------------------------------------------- zip end records
def _flip_end_records(runs, which: str, shift: int = 1 << 20) -> Path:
    """Make the first archive's zip64 end record (or, if none, its end record) point its
    central directory `shift` bytes off: too far, and zipfile seeks before the archive; too
    near, and it looks for every entry past its real place."""
    f = next(_dcp(runs).glob("*.distcp")) if which == "dcp" else _rank(runs)
    raw = bytearray(f.read_bytes())
    start, end = _archives(bytes(raw))[0]
    z64 = raw.rfind(b"PK\x06\x06", start, end)
    # the offset of the central directory: zip64 end record +48 (8 bytes), end record +16 (4)
    at, fmt = (z64 + 48, "<Q") if z64 >= 0 else (raw.rfind(b"PK\x05\x06", start, end) + 16, "<I")
    struct.pack_into(fmt, raw, at, struct.unpack_from(fmt, raw, at)[0] + shift)
    f.write_bytes(bytes(raw))
    return f


@pytest.mark.parametrize("shift", [1 << 20, -64])
def test_zip64_end_record_flip_in_dcp_blob(capsys, clean, runs, shift):
    f = _flip_end_records(runs, "dcp", shift)
    _refused(capsys, clean, runs, "dcp", rf"{f} \(bytes \d+-\d+, tensor '.*'\): corrupt or "
                                         r"truncated torch\.save archive")


def test_negative_offset_is_named_not_errno(capsys, clean, runs):
    f = _flip_end_records(runs, "verl")
    err = _refused(capsys, clean, runs, "verl", rf"{f}: corrupt or truncated torch\.save archive")
    assert "Errno" not in err


# --------------------------------------------------------------------- skipped checkpoints
@pytest.mark.parametrize("how", ["deleted", "fifo", "directory"])
def test_unreadable_dcp_metadata_is_an_error(capsys, clean, runs, how):
    md = _dcp(runs) / ".metadata"
    md.unlink()
    if how == "fifo":
        os.mkfifo(md)  # opened, it would block forever
    elif how == "directory":
        md.mkdir()
    what = "is missing" if how == "deleted" else "is not a regular file"
    _refused(capsys, clean, runs, "dcp", rf"{md}: {what}, so this torch DCP checkpoint cannot "
                                         r"be read")
    # asked for: left out with a warning naming it; the other steps are used
    code, err = _outcome(capsys, clean, runs, "dcp", "--skip-unreadable", same=False)
    assert code == 0 and err.splitlines()[0] == (
        f"relex: warning: skipping step 4 ({_dcp(runs)}): {md}: {what}, so this torch DCP "
        f"checkpoint cannot be read (its tensors are listed there); re-copy the checkpoint")
    assert err.splitlines()[1:] == [  # two steps left: too few to backtest the window
        "relex: warning: the verified horizon is unknown (a backtest needs at least 4 observed "
        "checkpoints, this window has 2): no backtest supports step 30"]


# --------------------------------------------------------------------- corrupted data
def test_stale_crc_in_tensor_bytes(capsys, clean, runs):
    """A flipped bit in a storage's bytes, CRC-32 left as it was: refused, on both formats."""
    for kind, f in (("verl", _rank(runs)), ("dcp", next(_dcp(runs).glob("*.distcp")))):
        raw = bytearray(f.read_bytes())
        start, end = _archives(bytes(raw))[-1]
        m = next(v for k, v in _members(bytes(raw), start, end).items() if "/data/" in k)
        raw[m["data"] + m["size"] // 2] ^= 0x10
        f.write_bytes(bytes(raw))
        _refused(capsys, clean, runs, kind, rf"{f}: the bytes of storage '.*' \(file bytes "
                                            r"\d+-\d+\) fail their CRC-32 check")
        # asked not to check: used as is
        code, _ = _outcome(capsys, clean, runs, kind, "--no-verify-checksums", same=False)
        assert code == 0


def test_crc_checked_when_read_but_not_released(runs):
    """Reader.verify checks every storage a pass read, released or not, and only those."""
    from relex.formats import open_reader
    f = _rank(runs, 2, 0)
    raw = bytearray(f.read_bytes())
    m = max((v for k, v in _members(bytes(raw), 0, len(raw)).items() if "/data/" in k),
            key=lambda v: v["size"])
    raw[m["data"] + 1] ^= 1
    f.write_bytes(bytes(raw))
    with open_reader(f.parent) as r:
        r.verify()  # nothing read yet: nothing to check
        for name, t in r.tensors.items():
            r.read(name, 0, t.numel)
        with pytest.raises(RelexError, match=rf"{f}: the bytes of storage '.*' .* fail their "
                                             r"CRC-32 check"):
            r.verify()


@pytest.mark.parametrize("delta", [-4, 4, 8])
def test_local_extra_length_mismatch(capsys, clean, runs, delta):
    f = _rank(runs)
    raw = bytearray(f.read_bytes())
    m = next(v for k, v in _members(bytes(raw), 0, len(raw)).items() if "/data/" in k
             and struct.unpack_from("<H", raw, v["local"] + 28)[0] >= 8)
    e = struct.unpack_from("<H", raw, m["local"] + 28)[0]
    struct.pack_into("<H", raw, m["local"] + 28, e + delta)
    f.write_bytes(bytes(raw))
    _refused(capsys, clean, runs, "verl", rf"{f}: corrupt zip entry '.*/data/\d+'")


def test_local_name_mismatch(capsys, clean, runs):
    f = _rank(runs)
    raw = bytearray(f.read_bytes())
    m = next(v for k, v in _members(bytes(raw), 0, len(raw)).items() if k.endswith("/data/1"))
    raw[m["local"] + 30 + struct.unpack_from("<H", raw, m["local"] + 26)[0] - 1] = ord("7")
    f.write_bytes(bytes(raw))
    _refused(capsys, clean, runs, "verl", rf"{f}: corrupt zip entry '.*/data/1' \(the local "
                                          r"header names")


def test_names_swapped_in_central_directory(capsys, clean, runs):
    f = _rank(runs)
    raw = bytearray(f.read_bytes())
    storages = [(k, v) for k, v in _members(bytes(raw), 0, len(raw)).items() if "/data/" in k]
    a, b = next((v, w) for i, (k, v) in enumerate(storages) for j, w in storages[i + 1:]
                if v["size"] == w["size"] and len(k) == len(j))
    name = lambda m: m["central"] + 46  # noqa: E731
    n = struct.unpack_from("<H", raw, a["central"] + 28)[0]
    raw[name(a): name(a) + n], raw[name(b): name(b) + n] = (raw[name(b): name(b) + n],
                                                            raw[name(a): name(a) + n])
    f.write_bytes(bytes(raw))
    _refused(capsys, clean, runs, "verl", rf"{f}: corrupt zip entry '.*/data/\d+' \(the local "
                                          r"header names")


def test_placements_checked_on_every_rank(capsys, clean, runs):
    """Rank 1 says Replicate where rank 0 says Shard(0): refused, naming rank 1's file."""
    f = _rank(runs, 4, 1)
    _, pkl = _data_pkl(f)
    pkl = pkl.replace(b"placement_types\nShard\n", b"placement_types\nReplicate\n", 1)
    _rezip(f, f.with_suffix(".tmp"), {"/data.pkl": pkl})
    f.with_suffix(".tmp").replace(f)
    _refused(capsys, clean, runs, "verl", rf"{f}: tensor '.*' is laid out as .* here but as "
                                          rf".* in model_world_size_{WORLD}_rank_0\.pt")


# --------------------------------------------------------------------- the fuzz
KINDS = ("flip", "flip-zip-record", "flip-tensor-bytes", "truncate", "extra-length",
         "swap-central-names", "pickle-byte", "memo-bomb")


def _mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes, bool]:
    """(kind, damaged bytes, CRC-consistent): one mutation of a torch.save file (or a .distcp
    of several archives). CRC-consistent ones (pickle bytes with their CRC-32 rewritten) make
    a different valid archive: relex may use it, so only the contract is checked."""
    kind = rng.choice(KINDS)
    b = bytearray(raw)
    archives = [(a, _members(raw, *a)) for a in _archives(raw)]
    # Megatron's .distcp files also hold archives of pickled bytes (extra state), and its
    # common.pt may hold no tensor: those have no storages to damage
    with_data = [x for x in archives if any("/data/" in k and m["size"] for k, m in x[1].items())]
    (start, end), members = rng.choice(with_data or archives)
    storages = [m for k, m in members.items() if "/data/" in k and m["size"]]
    if not storages and kind in ("flip-tensor-bytes", "extra-length", "swap-central-names"):
        kind = "flip-zip-record"
    pkl = next(m for k, m in members.items() if k.endswith("/data.pkl"))
    if kind == "flip":
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "flip-zip-record":
        sigs = [i for s in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06",
                            b"PK\x06\x07", b"PK\x07\x08") for i in _find(raw[start:end], s)]
        i = start + rng.choice(sigs) + rng.randrange(4, 46)
        b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
    elif kind == "flip-tensor-bytes":
        m = rng.choice(storages)
        b[m["data"] + rng.randrange(m["size"])] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "extra-length":
        m = rng.choice(storages)
        e = struct.unpack_from("<H", b, m["local"] + 28)[0]
        struct.pack_into("<H", b, m["local"] + 28, max(0, e + rng.choice([-8, -2, -1, 1, 4])))
    elif kind == "swap-central-names":
        x, y = rng.sample(storages, 2) if len(storages) > 1 else (storages[0], pkl)
        nx, ny = (struct.unpack_from("<H", b, m["central"] + 28)[0] for m in (x, y))
        if nx == ny:
            px, py = x["central"] + 46, y["central"] + 46
            b[px: px + nx], b[py: py + ny] = raw[py: py + ny], raw[px: px + nx]
        else:  # a name of another length: overwrite the last byte with a digit
            b[x["central"] + 46 + nx - 1] = ord(str(rng.randrange(10)))
    elif kind == "pickle-byte":
        b[pkl["data"] + rng.randrange(pkl["size"])] = rng.randrange(256)
        _set_crc(b, pkl)
        return kind, bytes(b), True
    else:  # a memo bomb in place of one small int of the pickle, CRC-32 rewritten
        data = raw[pkl["data"]: pkl["data"] + pkl["size"]]
        spots = [i for i in _find(data, b"K") if i > 2]
        i = rng.choice(spots)
        new = data[:i] + _bomb(rng.randrange(30, 60)) + data[i + 2:]
        blob = bytearray(raw[start:end])
        zbuf = __import__("io").BytesIO()
        with zipfile.ZipFile(__import__("io").BytesIO(bytes(blob))) as zin, \
                zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, new if info.filename.endswith("/data.pkl")
                              else zin.read(info))
        return kind, raw[:start] + zbuf.getvalue() + raw[end:], True
    return kind, bytes(b), False


def _mutate_plain(raw: bytes, rng: random.Random) -> tuple[str, bytes, bool]:
    """A DCP .metadata (a plain pickle, no checksum): a flipped bit or a truncation."""
    b = bytearray(raw)
    if rng.random() < 0.8:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return "metadata-flip", bytes(b), False
    return "metadata-truncate", bytes(b[: rng.randrange(len(b))]), False


def _fuzz(capsys, clean, root, kind: str, n: int, seed: int) -> dict:
    """n seeded mutations of one file each of root/kind; tallies per kind and outcome."""
    rng = random.Random(seed)
    files = ([_rank(root, s, r) for s in STEPS for r in range(WORLD)] if kind == "verl" else
             [f for s in STEPS for f in [*sorted(_dcp(root, s).glob("*.distcp")),
                                         _dcp(root, s) / ".metadata"]])
    tally: dict[str, int] = {}
    for case in range(n):
        f = rng.choice(files)
        raw = f.read_bytes()
        what, damaged, consistent = (_mutate_plain if f.name == ".metadata" else _mutate)(raw,
                                                                                          rng)
        f.write_bytes(damaged)
        try:
            code, err = _outcome(capsys, clean, root, kind, same=not consistent)
        except AssertionError as e:
            raise AssertionError(f"case {case} ({what} of {f.name}): {e}") from None
        finally:
            f.write_bytes(raw)
        if code == 2:
            named = str(f) in err or str(f.parent) in err
            assert named or consistent, f"case {case} ({what}): names another file: {err}"
        key = f"{what}: " + ("refused" if code else "same output" if _outcome.same else
                             "accepted, other output")  # the latter: CRC-consistent rewrites
        tally[key] = tally.get(key, 0) + 1
    return tally


@pytest.mark.parametrize("kind", ["verl", "dcp"])
def test_fuzz_fast(capsys, clean, runs, kind):
    """20 mutations per format in the default suite (the slow test runs 150)."""
    tally = _fuzz(capsys, clean, runs, kind, 20, seed=1)
    assert sum(v for k, v in tally.items() if k.endswith("refused")) >= 10, tally


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["verl", "dcp"])
def test_fuzz(capsys, clean, runs, kind):
    started = time.perf_counter()
    tally = _fuzz(capsys, clean, runs, kind, 150, seed=0)
    print(f"\n{kind}: 150 mutations in {time.perf_counter() - started:.0f} s: "
          f"{json.dumps(dict(sorted(tally.items())))}")
    assert sum(tally.values()) == 150
    assert not any(k.startswith("flip-tensor-bytes: same") for k in tally), tally
