"""Hostile checkpoint files for jlstm.load_torch_state_dict, and a check that runs each one in a
child process under an address-space limit and a time limit.

    python tests/hostile/make_hostile_files.py DIR          # write every case to DIR
    python tests/hostile/make_hostile_files.py --check DIR  # ... and load each; prints JSON

The files are built here (the biggest is 8 MiB), never committed. Each case is one class of attack
on the reader: a crash (a dict key nested 150,000 deep, frozensets), error messages that grow
exponentially (repr of a shared list), huge integers in sizes, keys whose hashes collide, floods of
cheap opcodes, zip archives that two zip readers read differently, records that alias one member.
Each must end in a ValueError naming the file, or (colliding int64 keys inside a legitimate
optimizer state) in the right tensors, within the bound of docs/torch_file_safety.md:

    peak memory beyond the returned arrays <= MEMORY_PER_FILE_BYTE * file size + MEMORY_ALLOWANCE
    time <= SECONDS + SECONDS_PER_MB * file size in MiB

The check forks one child per case from a process that has imported jlstm once, so that the cases
cost milliseconds each and not an interpreter start.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

# The bound that tests/hostile/test_hostile_files.py asserts (docs/torch_file_safety.md states it).
MEMORY_PER_FILE_BYTE = 64
MEMORY_ALLOWANCE = 64 << 20
SECONDS = 2.0
SECONDS_PER_MB = 1.0
P = 2**61 - 1  # CPython hashes an int n to n mod P: k * P all hash to 0


# --- a protocol-2/4 pickle written opcode by opcode (pickle's Pickler would import torch) ---------


def string(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def integer(n: int) -> bytes:
    data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def tensor(key: str = "0", size=(4,), stride=(1,), numel: int = 4) -> bytes:
    """torch._utils._rebuild_tensor_v2 of float32 storage `key`, as torch.save writes it."""
    pid = b"(" + string("storage") + b"ctorch\nFloatStorage\n" + string(key) + string("cpu")
    ints = lambda values: b"(" + b"".join(integer(v) for v in values) + b"t"  # noqa: E731
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + integer(numel)
        + b"tQ"
        + integer(0)
        + ints(size)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def state_dict(*items: bytes, protocol: int = 2) -> bytes:
    """`{k: v, ...}` of already pickled key/value pairs, as a whole pickle."""
    return bytes([0x80, protocol]) + b"}(" + b"".join(items) + b"u."


WEIGHT = np.arange(4, dtype=np.float32)  # storage 0 of every file unless a case says otherwise


def archive(pkl: bytes, records: dict[str, bytes] | None = None) -> bytes:
    """A torch-layout zip, written by Python's zipfile: data.pkl, byteorder, storage 0, version."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        out.writestr("archive/data.pkl", pkl)
        for name, data in (records or {"data/0": WEIGHT.tobytes()}).items():
            out.writestr(f"archive/{name}", data)
        out.writestr("archive/byteorder", b"little")
        out.writestr("archive/version", b"3\n")
    return buffer.getvalue()


# --- zips built byte by byte, for what zipfile will not write --------------------------------------


def local_record(name: str, data: bytes) -> bytes:
    raw = name.encode()
    crc = zlib.crc32(data)
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 33, crc, len(data), len(data),
                       len(raw), 0) + raw + data  # fmt: skip


def central_record(name: str, data: bytes, offset: int) -> bytes:
    raw = name.encode()
    crc = zlib.crc32(data)
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 33, crc, len(data),
                       len(data), len(raw), 0, 0, 0, 0, 0, offset) + raw  # fmt: skip


def end_record(count: int, size: int, offset: int) -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, size, offset, 0)


def members(records: dict[str, bytes], at: int = 0) -> tuple[bytes, list[bytes]]:
    """Local records from byte `at` on, and their central records."""
    body, central = b"", []
    for name, data in records.items():
        central.append(central_record(name, data, at + len(body)))
        body += local_record(name, data)
    return body, central


def torch_records(value: float) -> dict[str, bytes]:
    pkl = state_dict(string("weight") + tensor("0", (1,), (1,), 1))
    return {
        "archive/data.pkl": pkl,
        "archive/byteorder": b"little",
        "archive/data/0": np.float32(value).tobytes(),
        "archive/version": b"3\n",
    }


def two_central_directories() -> bytes:
    """The end record names directory A (weight 1.0, as torch reads it); directory B (weight 666.0)
    sits just before the end record, where Python's zipfile looks, with its offsets shifted by the
    length of A as zipfile then expects."""
    body_a, central_a = members(torch_records(1.0))
    body_b, central_b = members(torch_records(666.0), at=len(body_a))
    body = body_a + body_b
    directory_a = b"".join(central_a)
    shifted = [
        record[:42] + struct.pack("<I", struct.unpack_from("<I", record, 42)[0] - len(directory_a))
        + record[46:]
        for record in central_b
    ]  # fmt: skip
    directory_b = b"".join(shifted)
    return body + directory_a + directory_b + end_record(4, len(directory_b), len(body))


def prefixed_zip() -> bytes:
    """A member that the central directory does not list before the first one it lists, offsets
    shifted: zipfile reads it, miniz does not."""
    junk = local_record("archive/junk", b"#!/bin/sh\n" * 100)
    body, central = members(torch_records(1.0), at=len(junk))
    directory = b"".join(central)
    return junk + body + directory + end_record(4, len(directory), len(junk) + len(body))


def aliased_records(count: int = 3000) -> bytes:
    """`count` central records more, all pointing at storage 0's local record (16 KiB), and a
    stride-0 view that needs the 4x budget of every one of them: 200 MiB from a small file."""
    data = np.zeros(4096, np.float32).tobytes()
    view = tensor("0", (count * 4096,), (0,), 4096)
    records = torch_records(0.0) | {"archive/data/0": data}
    records["archive/data.pkl"] = state_dict(string("weight") + view)
    body, central = members(records)
    alias = central[2]  # storage 0's; each copy gets a name of its own
    aliases = [
        alias[:28] + struct.pack("<H", len(f"archive/data/a{i}")) + alias[30:46]
        + f"archive/data/a{i}".encode()
        for i in range(1, count + 1)
    ]  # fmt: skip
    directory = b"".join(central + aliases)
    return body + directory + end_record(len(central) + count, len(directory), len(body))


def duplicate_names() -> bytes:
    records = torch_records(1.0)
    body, central = members(records)
    second, second_central = members({"archive/data/0": np.float32(666).tobytes()}, at=len(body))
    directory = b"".join(central + second_central)
    body += second
    return body + directory + end_record(5, len(directory), len(body))


# --- pickles ----------------------------------------------------------------------------------------


def deep_tuple(depth: int) -> bytes:
    return b")" + b"\x85" * depth  # EMPTY_TUPLE, then TUPLE1 around it `depth` times


def list_dag(levels: int) -> bytes:
    """A list holding the list below it twice, `levels` deep: 13 bytes a level, 2**levels items in
    its repr. Written as pickle writes [a, a]: the outer list first, the inner ones memoized."""
    index = lambda op, i: op + struct.pack("<I", i)  # noqa: E731  LONG_BINPUT, LONG_BINGET
    down = b"".join(b"]" + index(b"r", i) + b"(" for i in range(levels))
    up = b"".join(index(b"j", i + 1) + b"e" for i in reversed(range(levels)))
    return down + b"]" + index(b"r", levels) + up


def big_int_dims(count: int = 5000) -> bytes:
    """A size tuple of `count` references to one 2040-bit integer."""
    big = b"\x8a\xff" + b"\xff" * 254 + b"\x7f"
    return b"ctorch._utils\n_rebuild_tensor_v2\n((" + string("storage") + (
        b"ctorch\nFloatStorage\n" + string("0") + string("cpu") + integer(4) + b"tQ" + integer(0)
        + b"(" + big + b"r\x00\x00\x00\x00" + b"j\x00\x00\x00\x00" * (count - 1) + b"t"
        + b"(" + integer(1) * count + b"t\x89ccollections\nOrderedDict\n)RtR"
    )  # fmt: skip


def colliding_keys(count: int, *, int64: bool) -> tuple[bytes, dict]:
    """An optimizer state keyed by ints that all hash alike: k * P (beyond int64 when not int64),
    or for int64 the at most 9 int64s in each class h + k * P. Three of them hold tensors."""
    if int64:
        keys = [h + k * P for h in range(count // 8 + 1) for k in range(-4, 4)][:count]
    else:
        keys = [k * P for k in range(1, count + 1)]
    pairs = b"".join(integer(k) + b"N" for k in keys[3:])
    pairs += b"".join(integer(k) + b"}" + string("exp_avg") + tensor() + b"s" for k in keys[:3])
    state = string("optimizer") + b"}" + string("state") + b"}(" + pairs + b"us"
    pkl = state_dict(string("model.weight") + tensor(), state)
    want = {"model.weight": WEIGHT} | {f"optimizer.state.{k}.exp_avg": WEIGHT for k in keys[:3]}
    return pkl, want


def cases() -> dict[str, tuple[bytes, str | dict]]:
    """name: (file, text the ValueError's message holds (or texts, split by " | "), or the arrays)."""
    deep = 150_000
    pid_dag = b"(" + string("storage") + list_dag(64) + b"tQ"
    metadata_dag = tensor()[: -len(b"tR")] + list_dag(64) + b"tR"
    deep_keys = archive(state_dict(string("w") + tensor(), deep_tuple(5000) + b"K\x01"))
    collide64, collide64_want = colliding_keys(40_000, int64=True)
    collide, _ = colliding_keys(40_000, int64=False)
    flood = (8 << 20) - 64  # data.pkl's limit is 8 MiB
    return {
        "crash: tuple key 150000 deep": (
            archive(state_dict(deep_tuple(deep) + b"K\x01")),
            "builds more objects than a state_dict of its size",
        ),
        "crash: tuple key 150000 deep in a nested dict, padded": (
            archive(
                state_dict(
                    string("w") + tensor(),
                    string("pad") + string("x" * 5 * deep),
                    string("x") + b"}" + deep_tuple(deep) + b"Ns",
                )
            ),
            "has a dict key <tuple of 1>",
        ),
        "crash: tuple key 5000 deep": (deep_keys, "has a dict key <tuple of 1>"),
        "crash: frozenset of a deep tuple": (
            archive(b"\x80\x04}(" + string("k") + b"(" + deep_tuple(5000) + b"\x91u."),
            "the opcode FROZENSET",
        ),
        "repr: list DAG in a persistent id": (
            archive(state_dict(string("w") + pid_dag)),
            "persistent id",
        ),
        "repr: list DAG as tensor metadata": (
            archive(state_dict(string("w") + metadata_dag)),
            "carries metadata [[<list of 2>, <list of 2>], [<list of 2>, <list of 2>]], which",
        ),
        "repr: list DAG as a state_dict value": (
            archive(state_dict(string("w") + list_dag(64))),
            "is reached twice",
        ),
        "big ints: 5000 dims of one 2040-bit int": (
            archive(state_dict(string("w") + big_int_dims())),
            "has 5000 dimensions",
        ),
        "big ints: a 2040-bit dim": (
            archive(state_dict(string("w") + big_int_dims(1))),
            "holds <an int of 2039 bits>, not a non-negative int64",
        ),
        "hash: 40000 keys k*(2**61-1) beyond int64": (
            archive(collide),
            "a checkpoint's dicts are keyed by names (str) or int64s",
        ),
        "hash: 40000 colliding int64 keys in an optimizer state": (
            archive(collide64),
            collide64_want,
        ),
        "hash: 40000 int keys at the top level": (
            archive(state_dict(*(integer(k * P) + b"N" for k in range(1, 40_001)))),
            "a checkpoint's dicts are keyed by names",
        ),
        "flood: 8M EMPTY_SET": (
            archive(b"\x80\x04" + b"\x8f" * flood + b"."),
            "the opcode EMPTY_SET",
        ),
        "flood: 4M memoized empty dicts": (
            archive(b"\x80\x04" + b"}\x94" * (flood // 2) + b"."),
            "has a STOP at byte",
        ),
        "flood: 8M empty dicts": (
            archive(b"\x80\x04" + b"}" * flood + b"."),
            "builds more objects than a state_dict of its size",
        ),
        "flood: 8M NONE": (archive(b"\x80\x02" + b"N" * flood + b"."), "has a STOP at byte"),
        "flood: 8M-deep tuple": (
            archive(state_dict(string("a") + b")" + b"\x85" * flood)),
            "builds more objects than a state_dict of its size",
        ),
        "flood: lists nested 2M deep": (
            archive(state_dict(string("a") + b"](" * (2 << 20) + b"e" * (2 << 20))),
            "builds more objects than a state_dict of its size | nested more than 100 containers",
        ),
        "flood: lists nested 1000 deep": (
            archive(state_dict(string("a") + b"](" * 1000 + b"e" * 1000)),
            "nested more than 100 containers deep",
        ),
        "zip: 3000 records aliasing one member": (aliased_records(), "overlaps another member"),
        "zip: two central directories": (
            two_central_directories(),
            "does not end where the end record begins",
        ),
        "zip: data before the first local header": (
            prefixed_zip(),
            "follows data that no member holds",
        ),
        "zip: one name twice": (duplicate_names(), "or appears twice"),
        "build: empties the state_dict": (
            archive(state_dict(string("w") + tensor())[:-1] + b"}b."),
            "sets the state of a <dict of 1>",
        ),
    }


# --- the check: each case in a forked child under limits ------------------------------------------


def _status(field: str) -> int:
    """A size from /proc/self/status (VmSize: address space, VmHWM: peak resident memory)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(path: Path, want) -> dict:
    """Loads `path` in the (forked) current process and describes what happened."""
    import jlstm

    try:
        got = jlstm.load_torch_state_dict(path)
    except ValueError as e:
        message = str(e)
        named = message.startswith(f"jlstm cannot load {str(path)!r}: ")
        expected = isinstance(want, str) and any(text in message for text in want.split(" | "))
        return {"outcome": "ValueError", "ok": named and expected, "message": message[:1000]}
    same = isinstance(want, dict) and list(got) == list(want)
    same = same and all(np.array_equal(got[k], want[k]) for k in want)
    return {"outcome": "arrays", "ok": same, "message": f"{len(got)} arrays: {list(got)[:4]}"}


def check(directory: str | os.PathLike) -> dict[str, dict]:
    """Writes every case to `directory` and loads each in a child process limited to the bound's
    memory (address space) and time; returns what each did, its time and its peak memory."""
    import resource
    import signal
    import time

    import jlstm  # noqa: F401  imported once, before the children are forked

    results = {}
    for number, (name, (data, want)) in enumerate(cases().items()):
        path = Path(directory) / f"case{number}.pt"
        path.write_bytes(data)
        memory = MEMORY_PER_FILE_BYTE * len(data) + MEMORY_ALLOWANCE
        seconds = SECONDS + SECONDS_PER_MB * len(data) / 2**20
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child: limits, load, report, exit without cleanup
            os.close(read)
            try:
                resource.setrlimit(
                    resource.RLIMIT_AS, (_status("VmSize") + memory, resource.RLIM_INFINITY)
                )
                signal.alarm(int(seconds * 3) + 1)
                rss, start = _rss(), time.perf_counter()
                result = _run(path, want) | {"seconds": time.perf_counter() - start}
                result["peak_bytes"] = _status("VmHWM") - rss
            except BaseException as e:  # MemoryError, a wrong exception type: the case fails
                result = {"outcome": type(e).__name__, "ok": False, "message": str(e)[:1000]}
            os.write(write, json.dumps(result).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read()
        _, status = os.waitpid(child, 0)
        result = json.loads(report) if report else {"outcome": "no report", "ok": False}
        if os.WIFSIGNALED(status):
            result |= {"outcome": f"killed by signal {os.WTERMSIG(status)}", "ok": False}
        result |= {
            "file_bytes": len(data),
            "memory_bound": memory,
            "time_bound": seconds,
        }
        results[name] = result
        path.unlink()
    return results


def main(argv: list[str]) -> None:
    if argv[:1] == ["--check"]:
        print(json.dumps(check(argv[1]), indent=1))
        return
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for number, (name, (data, _)) in enumerate(cases().items()):
        (out / f"case{number}.pt").write_bytes(data)
        print(f"case{number}.pt  {len(data):>9}  {name}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1:])
