"""PyTorch checkpoint files read and written without PyTorch, and without running code from them.

Two formats, told apart by their first bytes (not by suffix):

* **torch.save's zip archive** (torch >= 1.6; ``.pt``, ``.pth``, ``.bin``): an uncompressed zip of
  ``<archive>/data.pkl`` (a pickle of the state_dict), ``<archive>/data/<key>`` (the raw bytes of
  each storage), ``<archive>/byteorder`` and ``<archive>/version``. Every tensor in the pickle is a
  call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` on a storage named by
  a persistent id ``("storage", torch.FloatStorage, key, location, numel)``. Storages recorded as
  big-endian (``byteorder`` ``big``) are byteswapped; torch < 1.6's legacy format (pickles and raw
  storages back to back, no zip) is refused with the way to re-save it.
* **safetensors**: a JSON header and raw little-endian tensors, read and written by the
  ``safetensors`` package's numpy API. It holds no code, and no checksums either: damaged tensor
  bytes read as different numbers.

Safety (docs/torch_file_safety.md has the user's view). A file is untrusted input; for any file
the result is the tensors ``torch.load(path, weights_only=True)`` reads, or one ``ValueError``
naming the file, and:

* No code runs: the pickle is read by ``_unpickle``, an interpreter of only the opcodes
  ``torch.save`` writes, which resolves only the globals a state_dict needs (the three tensor
  rebuild functions, the ten storage types, ``collections.OrderedDict``) to inert stand-ins; any
  other global is refused before it is looked up, and torch is never imported.
* Memory and time are bounded by the file (tested: 64 bytes per byte of the file + 64 MiB, returned
  arrays included; 2 s + 1 s per MiB): ``data.pkl`` is at most 8 MiB and builds at most 48 bytes of
  objects per byte; nothing it builds is hashed (dict keys are str or int64), compared, or rendered
  beyond a few hundred characters (``_render``); nesting, dimensions and integers are bounded; views
  expand to at most 4x the bytes of the storages they use, each counted once.
* The zip is read as torch's reader (miniz) reads it (``_Archive``): a file that zip readers could
  read differently is refused, so jlstm and torch never return different tensors.
* Saves write a temporary file beside the destination and rename it over it (``_replace``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import pickletools
import re
import secrets
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jlstm.torch_io import _to_numpy, from_torch, to_torch

# torch's storage types, by the name a pickle uses, and the numpy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(jnp.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_SUPPORTED = ", ".join(str(dtype) for dtype in _STORAGE_NAMES)

# A state_dict's pickle takes a few hundred bytes per tensor, so this is tens of thousands of
# tensors; the limit bounds the time of the memo check, which parses the pickle in Python.
_MAX_PICKLE_BYTES = 8 << 20
# Views may overlap (tied weights), but the arrays they expand to may not exceed this multiple of
# the stored bytes (plus a small allowance): a stride-0 view of one element could ask for petabytes.
_MAX_EXPANSION = 4
_EXPANSION_ALLOWANCE = 1 << 20
# Records larger than this get zip64 size fields, which the 64-byte alignment has to count. zipfile
# itself switches above ZIP64_LIMIT / 1.05 bytes (~2 GiB); this threshold is below that.
_ZIP64_ABOVE = 1 << 30
_ALIGNMENT = 64  # torch aligns every record's data to 64 bytes (its .storage_alignment)
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch < 1.6 first pickles this number


class _Refused(Exception):
    """What is wrong with a file, raised inside the reader; the entry points add the file name."""


def _render(value, depth: int = 2) -> str:
    """A repr of at most a few hundred characters, whatever the file built. Messages quote values
    from the file, and a full repr() can be huge: a list holding the level below it twice, 64
    levels deep, has a repr of 2**64 elements (and a deep one makes repr() recurse)."""
    kind = type(value)
    if kind is str or kind is bytes:
        if len(value) <= 80:
            return repr(value)
        return f"{value[:80]!r}... ({len(value)} {'characters' if kind is str else 'bytes'})"
    if kind is int:
        return repr(value) if value.bit_length() <= 64 else f"<an int of {value.bit_length()} bits>"
    if kind in (float, bool, type(None)):
        return repr(value)
    if kind is _Global:
        return value.name
    if kind is _StorageType:
        return f"torch.{value.name}"
    if kind not in (tuple, list, dict, collections.OrderedDict):
        return f"<{kind.__name__.lstrip('_').lower()}>"
    if depth == 0:
        return f"<{kind.__name__} of {len(value)}>"
    shown = itertools.islice(value.items() if isinstance(value, dict) else value, 4)
    if isinstance(value, dict):
        parts = [f"{_render(k, 0)}: {_render(v, depth - 1)}" for k, v in shown]
    else:
        parts = [_render(v, depth - 1) for v in shown]
    if len(value) > 4:
        parts.append(f"... ({len(value)} items)")
    text = ", ".join(parts)
    if kind is list:
        return f"[{text}]"
    if kind is tuple:
        return f"({text},)" if len(value) == 1 else f"({text})"
    return f"{{{text}}}"


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType(NamedTuple):
    """Stands in for ``torch.FloatStorage`` etc.; only ever compared, never called."""

    name: str


class _Global(NamedTuple):
    """Stands in for an allowed callable of the pickle, by its qualified name."""

    name: str


def _check_ints(what: str, values, *, dims: bool) -> None:
    if dims and type(values) is not tuple:
        raise _Refused(f"a tensor's {what} is {type(values).__name__}, not a tuple")
    if dims and len(values) > _MAX_DIMS:
        raise _Refused(f"a tensor's {what} has {len(values)} dimensions; torch allows {_MAX_DIMS}")
    for value in values if dims else (values,):
        if type(value) is not int or not 0 <= value < _INT64:
            raise _Refused(f"a tensor's {what} holds {_render(value)}, not a non-negative int64")


def _rebuild_tensor(storage, offset, shape, stride) -> _Tensor:
    if type(storage) is not _Storage:
        raise _Refused(f"a tensor is rebuilt from a {_render(storage, 0)}, not a storage")
    _check_ints("storage offset", offset, dims=False)
    _check_ints("size", shape, dims=True)
    _check_ints("stride", stride, dims=True)
    if len(shape) != len(stride):
        raise _Refused(f"a tensor has size {shape} but stride {stride}")
    return _Tensor(storage, offset, shape, stride)


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, hooks, metadata=None):
    _check_hooks(requires_grad, hooks)
    if metadata:  # torch's conjugate/negative bits and the like: not plain tensor data
        raise _Refused(
            f"a tensor carries metadata {_render(metadata)}, which jlstm does not interpret"
        )
    return _rebuild_tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, requires_grad, hooks) -> _Tensor:
    _check_hooks(requires_grad, hooks)
    if type(data) is not _Tensor:
        raise _Refused(f"a parameter wraps a {_render(data, 0)}, not a tensor")
    return data


def _check_hooks(requires_grad, hooks) -> None:
    if type(requires_grad) is not bool or type(hooks) not in (dict, collections.OrderedDict):
        raise _Refused("a tensor has a non-bool requires_grad or hooks that are not a dict")
    if hooks:
        raise _Refused("a tensor has backward hooks")


# The callables a state_dict's pickle calls (REDUCE), with the numbers of arguments they take.
_CALLABLES = {
    "torch._utils._rebuild_tensor_v2": (_rebuild_tensor_v2, 6, 7),
    "torch._utils._rebuild_tensor": (_rebuild_tensor, 4, 4),
    "torch._utils._rebuild_parameter": (_rebuild_parameter, 3, 3),
    "collections.OrderedDict": (collections.OrderedDict, 0, 0),  # then its items, by SETITEMS
}


def _find_global(module, name):
    if type(module) is not str or type(name) is not str:
        raise _Refused("data.pkl names a global by something other than strings")
    qualified = f"{module}.{name}"
    if qualified in _CALLABLES:
        return _Global(qualified)
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
    raise _Refused(
        f"data.pkl references the global {_render(qualified)}, which is refused: jlstm reads "
        "only tensors and containers of them (what torch.load(weights_only=True) allows) and runs "
        "no code from a file; a whole pickled model (torch.save(model)) must be re-saved as "
        "torch.save(model.state_dict(), path)"
    )


def _call(func, args):
    if type(func) is not _Global:
        raise _Refused(
            f"data.pkl calls {_render(func, 0)}; it may call only {', '.join(_CALLABLES)}"
        )
    if type(args) is not tuple:
        raise _Refused(f"data.pkl calls {func.name} with {_render(args, 0)}, not a tuple")
    function, least, most = _CALLABLES[func.name]
    if not least <= len(args) <= most:
        takes = f"{least}" if least == most else f"{least} or {most}"
        raise _Refused(f"data.pkl calls {func.name} with {len(args)} arguments; it takes {takes}")
    return function(*args)


def _persistent_load(pid) -> _Storage:
    if not (
        type(pid) is tuple
        and len(pid) == 5
        and pid[0] == "storage"
        and type(pid[1]) is _StorageType
        and type(pid[2]) is str
        and 0 < len(pid[2]) <= 64
        and pid[2].isascii()
        and pid[2].isalnum()
        and type(pid[3]) is str
        and type(pid[4]) is int
        and 0 <= pid[4] < _INT64
    ):
        raise _Refused(
            f"data.pkl has the persistent id {_render(pid)}; expected ('storage', "
            "<torch storage type>, key, location, numel)"
        )
    _, storage_type, key, _, numel = pid
    return _Storage(key, _STORAGE_DTYPES[storage_type.name], numel)


# What unpickling may allocate, in bytes (CPython's object sizes, rounded up): at most
# _PICKLE_MEMORY times data.pkl's size, plus _PICKLE_ALLOWANCE. torch.save's pickles of state_dicts
# and training checkpoints need up to ~24 per byte (protocol 4's one-byte MEMOIZE is the densest);
# floods of one-byte opcodes that each make a container would need 64 or more.
_PICKLE_MEMORY = 48
_PICKLE_ALLOWANCE = 1 << 20
_PUSH, _OBJECT, _CONTAINER, _ITEM = (
    8,
    32,
    64,
    96,
)  # a stack slot, a scalar, a container, a dict item
_MAX_DEPTH = 100  # containers inside containers; a training checkpoint nests ~5 deep
_MAX_DIMS = 64  # torch's limit on a tensor's dimensions
_INT64 = 1 << 63  # sizes, strides, offsets, numels and dict keys that are ints must fit an int64


def _unpickle(pkl: bytes):
    """data.pkl's object, built by an interpreter of only the opcodes ``torch.save`` writes at pickle
    protocols 2 to 5 (what ``torch/_weights_only_unpickler.py`` reads, plus protocol 4's framing,
    short strings, memoize and stack-global).

    Nothing it builds is ever hashed, compared or rendered in full: dict keys must be strings or
    int64s (hashing a key nested 150,000 deep would overflow the C stack), sets and frozensets are
    refused, and BUILD is allowed only where torch writes it (a state_dict's ``_metadata``, which is
    ignored). Memo entries must come in order, as every pickler writes them. Memory is charged as
    objects are made and bounded by the pickle's size; time is linear in it.
    """
    if len(pkl) < 2 or pkl[0] != 0x80 or not 2 <= pkl[1] <= 5:
        raise _Refused("data.pkl does not start with PROTO 2 to 5, as torch.save writes")
    budget = _PICKLE_MEMORY * len(pkl) + _PICKLE_ALLOWANCE
    stack, metastack, memo = [], [], []
    unpack = struct.unpack_from
    at, end = 2, len(pkl)
    try:
        while True:
            if budget < 0:
                raise _Refused(
                    f"data.pkl builds more objects than a state_dict of its size "
                    f"({_PICKLE_MEMORY} bytes of memory per byte of its {len(pkl)})"
                )
            start, op = at, pkl[at]
            at += 1
            if op == 0x94:  # MEMOIZE
                memo.append(stack[-1])
                budget -= _PUSH
            elif op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT
                index = pkl[at] if op == 0x71 else unpack("<I", pkl, at)[0]
                at += 1 if op == 0x71 else 4
                if index != len(memo):
                    raise _Refused(
                        f"data.pkl stores memo entry {index} where entry {len(memo)} is next "
                        "(picklers number them in order)"
                    )
                memo.append(stack[-1])
                budget -= _PUSH
            elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                index = pkl[at] if op == 0x68 else unpack("<I", pkl, at)[0]
                at += 1 if op == 0x68 else 4
                if index >= len(memo):
                    raise _Refused(f"data.pkl reads memo entry {index} before storing it")
                stack.append(memo[index])
                budget -= _PUSH
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                budget -= _CONTAINER
            elif op in (0x58, 0x8C, 0x8D, 0x42, 0x43, 0x8E):  # strings and bytes
                if op == 0x8C or op == 0x43:  # SHORT_BINUNICODE, SHORT_BINBYTES
                    n, at = pkl[at], at + 1
                elif op == 0x58 or op == 0x42:  # BINUNICODE, BINBYTES
                    n, at = unpack("<I", pkl, at)[0], at + 4
                else:  # BINUNICODE8, BINBYTES8
                    n, at = unpack("<Q", pkl, at)[0], at + 8
                if at + n > end:
                    raise _Refused(f"data.pkl is truncated (a string at byte {start})")
                data = pkl[at : at + n]
                at += n
                stack.append(
                    data.decode("utf-8", "surrogatepass") if op in (0x58, 0x8C, 0x8D) else data
                )
                budget -= _OBJECT + _PUSH + n
            elif op == 0x4B:  # BININT1: ints below 256 are shared objects
                stack.append(pkl[at])
                at += 1
                budget -= _PUSH
            elif op == 0x4D:  # BININT2
                stack.append(unpack("<H", pkl, at)[0])
                at += 2
                budget -= _OBJECT + _PUSH
            elif op == 0x4A:  # BININT
                stack.append(unpack("<i", pkl, at)[0])
                at += 4
                budget -= _OBJECT + _PUSH
            elif op == 0x8A:  # LONG1 (LONG4, for ints over 2040 bits, is refused)
                n = pkl[at]
                if at + 1 + n > end:
                    raise _Refused(f"data.pkl is truncated (an int at byte {start})")
                stack.append(int.from_bytes(pkl[at + 1 : at + 1 + n], "little", signed=True))
                at += 1 + n
                budget -= _OBJECT + _PUSH + n
            elif op == 0x47:  # BINFLOAT
                stack.append(unpack(">d", pkl, at)[0])
                at += 8
                budget -= _OBJECT + _PUSH
            elif op == 0x74:  # TUPLE
                items = stack
                stack = metastack.pop()
                stack.append(tuple(items))
                budget -= _CONTAINER + _PUSH * len(items)
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
                budget -= _CONTAINER
            elif op == 0x86 or op == 0x87:  # TUPLE2, TUPLE3
                n = op - 0x84
                if len(stack) < n:
                    raise IndexError
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
                budget -= _CONTAINER
            elif op == 0x29:  # EMPTY_TUPLE: a shared object
                stack.append(())
                budget -= _PUSH
            elif op == 0x7D or op == 0x5D:  # EMPTY_DICT, EMPTY_LIST
                stack.append({} if op == 0x7D else [])
                budget -= _CONTAINER + _PUSH
            elif op == 0x73 or op == 0x75:  # SETITEM, SETITEMS
                if op == 0x73:
                    items = stack[-2:]
                    del stack[-2:]
                else:
                    items = stack
                    stack = metastack.pop()
                target = stack[-1]
                if type(target) is not dict and type(target) is not collections.OrderedDict:
                    raise _Refused(f"data.pkl sets items of a {_render(target, 0)}, not a dict")
                if len(items) % 2:
                    raise _Refused(f"data.pkl sets a dict item without a value at byte {start}")
                for i in range(0, len(items), 2):
                    key = items[i]
                    if type(key) is not str and not (type(key) is int and -_INT64 <= key < _INT64):
                        raise _Refused(
                            f"data.pkl has a dict key {_render(key, 0)}; a checkpoint's dicts "
                            "are keyed by names (str) or int64s"
                        )
                    target[key] = items[i + 1]
                budget -= _ITEM * (len(items) // 2)
            elif op == 0x61 or op == 0x65:  # APPEND, APPENDS
                if op == 0x61:
                    items = [stack.pop()]
                else:
                    items = stack
                    stack = metastack.pop()
                if type(stack[-1]) is not list:
                    raise _Refused(f"data.pkl appends to a {_render(stack[-1], 0)}, not a list")
                stack[-1].extend(items)
            elif op == 0x4E or op == 0x88 or op == 0x89:  # NONE, NEWTRUE, NEWFALSE
                stack.append(None if op == 0x4E else op == 0x88)
                budget -= _PUSH
            elif op == 0x63:  # GLOBAL: "module\nname\n"
                names = []
                for _ in range(2):
                    newline = pkl.find(b"\n", at, at + 1000)
                    if newline < 0:
                        raise _Refused(f"data.pkl has a malformed GLOBAL at byte {start}")
                    names.append(pkl[at:newline].decode("utf-8"))
                    at = newline + 1
                stack.append(_find_global(*names))
                budget -= _CONTAINER
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                stack[-1] = _find_global(stack[-1], name)
                budget -= _CONTAINER
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                stack[-1] = _call(stack[-1], args)
                budget -= 2 * _CONTAINER
            elif op == 0x51:  # BINPERSID
                stack[-1] = _persistent_load(stack[-1])
                budget -= _CONTAINER
            elif op == 0x62:  # BUILD
                state = stack.pop()
                if type(stack[-1]) is not collections.OrderedDict or type(state) is not dict:
                    raise _Refused(
                        f"data.pkl sets the state of a {_render(stack[-1], 0)} to "
                        f"{_render(state, 0)}; torch.save does so only for a state_dict's "
                        "attributes (an OrderedDict's, from a dict)"
                    )
            elif op == 0x95:  # FRAME: protocol 4's framing, which needs no checking here
                at += 8
            elif op == 0x2E:  # STOP
                if at != end or metastack or len(stack) != 1:
                    raise _Refused(f"data.pkl has a STOP at byte {start} before its end")
                return stack[0]
            else:
                name = pickletools.code2op.get(chr(op))
                raise _Refused(
                    f"data.pkl has the opcode {name.name if name else hex(op)} at byte {start}, "
                    "which torch.save does not write for a state_dict"
                )
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        where = "ends early" if at >= end else f"is malformed at byte {start}"
        raise _Refused(
            f"data.pkl is corrupt or truncated: it {where} ({type(e).__name__})"
        ) from None


def _walk(root, max_chars: int) -> dict[str, _Tensor]:
    """The tensors of a (possibly nested) state_dict, keyed by dotted path as torch names them.

    Nested dicts, lists and tuples are descended (a checkpoint ``{"model": sd, "epoch": 3}`` gives
    ``model.<name>``); plain values (numbers, strings, None) are left out. Iterative, visiting each
    container once, at most ``_MAX_DEPTH`` deep, and building at most ``max_chars`` characters of
    names, so that neither a cyclic or deeply nested pickle nor one that shares a long key many times
    can recurse, loop or swell.
    """
    if type(root) is not dict and type(root) is not collections.OrderedDict:
        raise _Refused(f"data.pkl holds a {type(root).__name__}, not a state_dict (a dict)")
    for key in root:
        if type(key) is not str:
            raise _Refused(f"the state_dict has the key {_render(key)}; its keys are names (str)")
    containers = (dict, collections.OrderedDict, list, tuple)
    tensors, seen, stack, chars = {}, set(), [("", root, 0)], 0
    while stack:
        path, node, depth = stack.pop()
        if type(node) is _Tensor:
            if path in tensors:
                raise _Refused(f"two tensors are named {_render(path)}")
            tensors[path] = node
            continue
        where = _render(path) if path else "the state_dict"
        if depth > _MAX_DEPTH:
            raise _Refused(f"{where} is nested more than {_MAX_DEPTH} containers deep")
        if node and id(node) in seen:
            raise _Refused(f"{where} is reached twice (a cyclic pickle)")
        seen.add(id(node))
        children = []
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if type(value) in containers or type(value) is _Tensor:
                name = f"{path}.{key}" if path else str(key)
                chars += len(name)
                if chars > max_chars:
                    raise _Refused(f"the state_dict's names add up to over {max_chars} characters")
                children.append((name, value, depth + 1))
            elif type(value) not in (int, float, str, bytes, bool, type(None)):
                raise _Refused(f"{where}[{_render(key)}] is {_render(value, 0)}, not a tensor")
        stack.extend(reversed(children))
    return tensors


# The zip records torch's reader (miniz) reads: end of central directory (and its zip64 locator
# and record), central directory entries, local headers.
_END = struct.Struct("<4sHHHHIIH")
_LOCATOR = struct.Struct("<4sIQI")
_END64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_SATURATED = 0xFFFFFFFF  # a 32-bit size or offset whose value is in the zip64 extra field


class _Member(NamedTuple):
    name: str
    start: int  # of its data
    size: int
    crc: int


def _read_at(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise _Refused(f"the zip archive is truncated (at byte {offset})")
    return data


def _zip64_values(extra: bytes, values: tuple[int, ...]) -> list[int]:
    """The saturated ones of ``values`` (sizes, then offset) replaced from the zip64 extra field."""
    at = 0
    while at + 4 <= len(extra):
        kind, n = struct.unpack_from("<HH", extra, at)
        if kind == 1:
            field, out = extra[at + 4 : at + 4 + n], []
            for value in values:
                if value == _SATURATED:
                    value, field = struct.unpack_from("<Q", field)[0], field[8:]
                out.append(value)
            return out
        at += 4 + n
    raise _Refused("a zip member has saturated sizes but no zip64 field")


class _Archive:
    """One torch zip checkpoint, read the one way torch's reader (miniz) reads it.

    The central directory is where the end record says, and ends where the end record (or its
    zip64 record) begins; the first local header is at byte 0; members do not overlap; every local
    header agrees with its central entry; names are unique. A zip that other readers could read
    differently (Python's zipfile, for one, looks for the central directory just before the end
    record) is refused rather than read one way or the other. Members are read and CRC-checked.
    """

    def __init__(self, file, size: int):
        self.file = file
        tail_start = max(0, size - _END.size - 0xFFFF)
        tail = _read_at(file, tail_start, size - tail_start)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _END.size:
            raise _Refused("it has no zip end record (truncated?)")
        end = tail_start + at
        _, disk, cd_disk, count_here, count, cd_size, cd_offset, comment = _END.unpack_from(
            tail, at
        )
        if end + _END.size + comment != size:
            raise _Refused(f"its zip end record (at byte {end}) is not at the end of the file")
        cd_end = end
        if (
            end >= _LOCATOR.size
            and tail[at - _LOCATOR.size : at - _LOCATOR.size + 4] == b"PK\x06\x07"
        ):
            _, locator_disk, end64, disks = _LOCATOR.unpack(_read_at(file, end - _LOCATOR.size, 20))
            record = _END64.unpack(_read_at(file, end64, _END64.size))
            if record[0] != b"PK\x06\x06" or end64 + 12 + record[1] != end - _LOCATOR.size:
                raise _Refused("its zip64 end record is not where its locator says")
            if locator_disk or disks != 1:
                raise _Refused("it is a zip archive split over several disks")
            wide = record[4:]  # disk, directory's disk, entries here, entries, size, offset
            for short, long, saturated in zip(
                (disk, cd_disk, count_here, count, cd_size, cd_offset),
                wide,
                (0xFFFF,) * 4 + (_SATURATED,) * 2,
                strict=True,
            ):
                if short not in (long, saturated):
                    raise _Refused("its zip end record and zip64 end record disagree")
            disk, cd_disk, count_here, count, cd_size, cd_offset = wide
            cd_end = end64
        if disk or cd_disk or count_here != count:
            raise _Refused("it is a zip archive split over several disks")
        if cd_offset + cd_size != cd_end:
            raise _Refused(
                f"its central directory ({cd_size} bytes at byte {cd_offset}) does not end where "
                f"the end record begins (byte {cd_end}); zip readers would disagree on its contents"
            )
        if count == 0:
            raise _Refused("the zip archive is empty")
        if count * _CENTRAL.size > cd_size:
            raise _Refused(f"its central directory cannot hold the {count} entries it declares")
        directory = _read_at(file, cd_offset, cd_size)
        entries, at = [], 0
        for _ in range(count):
            fields = _CENTRAL.unpack_from(directory, at)
            signature, flags, method, crc, packed, size_, name_len, extra_len = (
                fields[0],
                fields[3],
                fields[4],
                fields[7],
                fields[8],
                fields[9],
                fields[10],
                fields[11],
            )
            offset = fields[16]
            raw_name = directory[at + 46 : at + 46 + name_len]
            extra = directory[at + 46 + name_len : at + 46 + name_len + extra_len]
            at += 46 + name_len + extra_len + fields[12]
            if signature != b"PK\x01\x02" or at > cd_size:
                raise _Refused("its central directory is malformed")
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
            if _SATURATED in (packed, size_, offset):
                size_, packed, offset = _zip64_values(extra, (size_, packed, offset))
            if flags & 0x41:
                raise _Refused(f"member {_render(name)} is encrypted")
            if method != 0:
                raise _Refused(
                    f"member {_render(name)} is compressed; torch.save stores members as is"
                )
            if packed != size_:
                raise _Refused(f"member {_render(name)} has two different sizes")
            entries.append((offset, name, raw_name, flags, crc, size_))
        if at != cd_size:
            raise _Refused("its central directory has bytes after its last entry")
        self.prefix = entries[0][1].split("/")[0] + "/"
        self.members: dict[str, _Member] = {}
        previous_end = 0
        for offset, name, raw_name, flags, crc, size_ in sorted(entries):
            if not name.startswith(self.prefix) or name in self.members:
                raise _Refused(
                    f"member {_render(name)} is not in one archive folder {_render(self.prefix)} "
                    "or appears twice"
                )
            if offset != previous_end and not self.members or offset < previous_end:
                raise _Refused(
                    f"member {_render(name)} (at byte {offset}) overlaps another member or "
                    "follows data that no member holds"
                )
            header = _LOCAL.unpack(_read_at(file, offset, _LOCAL.size))
            local_flags, local_crc, local_sizes = header[2], header[6], (header[8], header[7])
            name_len, extra_len = header[9], header[10]
            local_name = _read_at(file, offset + _LOCAL.size, name_len)
            if _SATURATED in local_sizes:
                local_extra = _read_at(file, offset + _LOCAL.size + name_len, extra_len)
                local_sizes = tuple(_zip64_values(local_extra, local_sizes))
            deferred = flags & 0x8 and local_crc == 0 and local_sizes == (0, 0)  # data descriptor
            if (
                header[0] != b"PK\x03\x04"
                or local_name != raw_name
                or local_flags != flags
                or header[3] != 0
                or not deferred
                and (local_crc, local_sizes) != (crc, (size_, size_))
            ):
                raise _Refused(f"member {_render(name)}'s local header disagrees with its entry")
            start = offset + _LOCAL.size + name_len + extra_len
            previous_end = start + size_
            if previous_end > cd_offset:
                raise _Refused(f"member {_render(name)} runs into the central directory")
            self.members[name] = _Member(name, start, size_, crc)
        self.storages: dict[str, np.ndarray] = {}

    def read(self, record: str, *, limit: int | None = None) -> bytes | None:
        member = self.members.get(self.prefix + record)
        if member is None:
            return None
        if limit is not None and member.size > limit:
            raise _Refused(f"{record} has {member.size} bytes, more than {limit}")
        data = _read_at(self.file, member.start, member.size)
        if zlib.crc32(data) != member.crc:
            raise _Refused(f"Bad CRC-32 for file {_render(member.name)}")
        return data

    def storage(self, storage: _Storage, byteorder: str) -> np.ndarray:
        """The storage as a flat array of its dtype, in native byte order; each is read once."""
        key = storage.key
        if key not in self.storages:
            data = self.read(f"data/{key}")
            if data is None:
                raise _Refused(
                    f"storage {key!r} is not in the archive (no {self.prefix}data/{key})"
                )
            if len(data) != storage.numel * storage.dtype.itemsize:
                raise _Refused(
                    f"storage {key!r} holds {len(data)} bytes but data.pkl declares {storage.numel} "
                    f"{storage.dtype} elements"
                )
            array = np.frombuffer(data, storage.dtype)
            if byteorder != sys.byteorder and storage.dtype.itemsize > 1:
                array = array.view(f"u{storage.dtype.itemsize}").byteswap().view(storage.dtype)
            if storage.dtype == np.bool_ and np.any(array.view(np.uint8) > 1):
                raise _Refused(f"bool storage {key!r} holds bytes other than 0 and 1")
            self.storages[key] = array
        array = self.storages[key]
        if array.dtype != storage.dtype:
            raise _Refused(f"storage {key!r} is used as both {array.dtype} and {storage.dtype}")
        return array


def _array(storage: np.ndarray, name: str, tensor: _Tensor) -> np.ndarray:
    shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
    end = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    if end > storage.size if math.prod(shape) else offset > storage.size:
        raise _Refused(
            f"tensor {_render(name)} (offset {offset}, size {shape}, stride {stride}) points "
            f"outside its storage of {storage.size} elements"
        )
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape, [s * itemsize for s in stride], writeable=False
    )
    return np.array(view, order="C")  # a copy: C-contiguous, writable, not the file's bytes


# torch.load refuses files whose version record is outside these (PyTorchStreamReader's
# kMinSupportedFileFormatVersion and kMaxSupportedFileFormatVersion); it reads the number as
# std::stoull does: leading white space, digits, anything after them ignored.
_VERSIONS = range(1, 11)
_STOULL = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]{1,19})")


def _read_zip(file, size: int) -> dict[str, np.ndarray]:
    archive = _Archive(file, size)
    byteorder = archive.read("byteorder", limit=16)
    if byteorder is None:
        byteorder = b"little"  # torch.load's default for files without the record
    if byteorder not in (b"little", b"big"):
        raise _Refused(
            f"byteorder record is {_render(byteorder)}, not b'little' or b'big' (torch.load "
            "refuses it too)"
        )
    version = archive.read(".data/version", limit=64) or archive.read("version", limit=64)
    if version is None:
        raise _Refused(f"the zip archive has no {archive.prefix}version record, which torch needs")
    number = _STOULL.match(version)
    if not number or int(number[1]) not in _VERSIONS:
        raise _Refused(
            f"version record is {_render(version)}; torch.load reads versions "
            f"{_VERSIONS[0]} to {_VERSIONS[-1]} and refuses this file too"
        )
    pkl = archive.read("data.pkl", limit=_MAX_PICKLE_BYTES)
    if pkl is None:
        raise _Refused(f"the zip archive has no {archive.prefix}data.pkl: not a torch checkpoint")
    # Names take a small multiple of the pickle's bytes (it holds each key once, prefixes aside).
    tensors = _walk(_unpickle(pkl), max_chars=16 * len(pkl) + (1 << 20))
    storages = {name: archive.storage(t.storage, byteorder.decode()) for name, t in tensors.items()}
    # Members do not overlap and each storage is counted once, so this is at most the file's size.
    stored = sum(array.nbytes for array in archive.storages.values())
    budget = _MAX_EXPANSION * stored + _EXPANSION_ALLOWANCE
    for name, tensor in tensors.items():
        budget -= math.prod(tensor.shape) * tensor.storage.dtype.itemsize
        if budget < 0:
            raise _Refused(
                f"its tensor views expand to more than {_MAX_EXPANSION} times the {stored} bytes "
                f"stored (at {_render(name)}); overlapping views are refused"
            )
    return {name: _array(storages[name], name, tensor) for name, tensor in tensors.items()}


def _read(path) -> dict[str, np.ndarray]:
    with open(path, "rb") as file:  # OSError (no such file, ...) is not about the contents
        head = file.read(16)
        size = os.fstat(file.fileno()).st_size
        file.seek(0)
        try:
            if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
                return _read_zip(file, size)
            if head.startswith(b"\x80") and head[2:].startswith(_LEGACY_MAGIC):  # after PROTO n
                raise _Refused(
                    "it is in torch's legacy format (torch.save before 1.6, or with "
                    "_use_new_zipfile_serialization=False), which jlstm does not read; re-save it "
                    "with torch >= 1.6: torch.save(torch.load(path, weights_only=True), new_path)"
                )
            if head[8:9] == b"{":
                return dict(safetensors.numpy.load_file(path))
            raise _Refused(
                f"it starts with {head[:8]!r}: neither a torch.save zip archive nor safetensors"
            )
        except _Refused as e:
            raise ValueError(f"jlstm cannot load {os.fspath(path)!r}: {e}") from None
        except MemoryError:
            raise
        except Exception as e:  # any failure to parse untrusted bytes is the file's fault
            raise ValueError(
                f"jlstm cannot load {os.fspath(path)!r}: the file is corrupt or truncated "
                f"({type(e).__name__}: {_render(str(e))})"
            ) from e


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a PyTorch checkpoint file, as numpy arrays, without PyTorch.

    Reads what ``torch.save(model.state_dict(), path)`` writes (the zip format of torch >= 1.6;
    ``.pt``, ``.pth``, ``.bin``) and ``.safetensors`` files; the format is told by the contents.
    No code from the file runs: see the module docstring for what is refused.

    Args:
      path: the file.

    Returns:
      ``{name: array}`` in the file's order: float16/32/64, ``jnp.bfloat16`` (ml_dtypes), int8-64,
      uint8 or bool arrays with the tensors' shapes, contiguous copies also where the file holds
      strided views of a shared storage. A nested checkpoint (``{"model": state_dict, "epoch": 3}``)
      gives dotted names (``model.lstm.weight_ih_l0``); values that are not tensors are left out.

    Raises:
      ValueError: the file is not a checkpoint, is damaged, or names anything but tensors and
        containers; the message names the file and the problem.

    >>> import os, tempfile, numpy as np, jlstm
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> jlstm.save_torch_state_dict(path, {"linear.weight": np.eye(2, dtype=np.float32)})
    >>> jlstm.load_torch_state_dict(path)
    {'linear.weight': array([[1., 0.],
           [0., 1.]], dtype=float32)}
    """
    return _read(path)


def load_torch(path: str | os.PathLike, *, prefix: str = "", dtype=None) -> dict[str, jax.Array]:
    """The recurrent layer or cell under ``prefix`` in a PyTorch checkpoint file, as jlstm params.

    ``jlstm.from_torch`` applied to :func:`load_torch_state_dict`; PyTorch need not be installed and
    no code from the file runs.

    Args:
      path: a ``torch.save`` zip checkpoint (``.pt``, ``.pth``, ``.bin``) or a ``.safetensors`` file.
      prefix: the submodule's name and a dot, e.g. ``"encoder.lstm."`` for the ``lstm`` attribute of
        a model's ``encoder``; ``""`` when the file is the recurrent module's own state_dict.
      dtype: cast to this dtype; default keeps the file's (float64 needs ``jax_enable_x64``).

    Returns:
      The params dict of :func:`jlstm.lstm` (or gru, rnn, a cell): torch's names, shapes and order.

    >>> import os, tempfile, jax, jlstm
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> jlstm.save_torch(path, jlstm.init_gru(jax.random.key(0), 2, 3), prefix="encoder.gru.")
    >>> list(jlstm.load_torch(path, prefix="encoder.gru."))
    ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0']
    """
    return from_torch(_read(path), prefix=prefix, dtype=dtype)


def _zip_record(file, archive: zipfile.ZipFile, name: str, data: bytes | np.ndarray) -> None:
    """Writes one stored member whose data starts on a 64-byte boundary, padded as torch pads: an
    extra field with id ``FB``."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible files
    info.file_size = len(data)
    zip64 = len(data) > _ZIP64_ABOVE
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    padding = -(file.tell() + header) % _ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as member:
        member.write(data)


def _pickle_state_dict(arrays: dict[str, np.ndarray]) -> bytes:
    """The protocol-2 pickle torch.save writes for a state_dict of contiguous tensors, one storage
    each (``data/0``, ``data/1``, ...), as opcodes: pickle's own Pickler would import torch to
    check each global it writes."""

    def string(s: str) -> bytes:
        b = s.encode("utf-8")
        return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE

    def integer(n: int) -> bytes:
        if n < 1 << 31:
            return b"J" + struct.pack("<i", n)  # BININT
        b = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
        return b"\x8a" + bytes([len(b)]) + b  # LONG1

    def ints(values) -> bytes:
        return b"(" + b"".join(integer(v) for v in values) + b"t"  # MARK ... TUPLE

    def global_(module: str, name: str) -> bytes:
        return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL

    empty_ordered_dict = global_("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE REDUCE
    out = [b"\x80\x02", empty_ordered_dict, b"("]  # PROTO 2, OrderedDict(), MARK
    for key, (name, array) in enumerate(arrays.items()):
        strides = [math.prod(array.shape[i + 1 :]) for i in range(array.ndim)]
        storage = global_("torch", _STORAGE_NAMES[array.dtype])
        pid = b"(" + string("storage") + storage + string(str(key)) + string("cpu")
        out += [string(name), global_("torch._utils", "_rebuild_tensor_v2"), b"("]
        out += [pid, integer(array.size), b"tQ"]  # TUPLE BINPERSID: the storage
        out += [integer(0), ints(array.shape), ints(strides), b"\x89", empty_ordered_dict]
        out.append(b"tR")  # TUPLE REDUCE: _rebuild_tensor_v2(storage, 0, size, stride, False, {})
    out.append(b"u.")  # SETITEMS STOP
    return b"".join(out)


def _write_zip(path, arrays: dict[str, np.ndarray]) -> None:
    """torch.save's records, in its order; each array's bytes are written from the array itself."""
    with open(path, "wb") as file, zipfile.ZipFile(file, "w") as archive:
        _zip_record(file, archive, "archive/data.pkl", _pickle_state_dict(arrays))
        _zip_record(file, archive, "archive/.format_version", b"1")
        _zip_record(file, archive, "archive/.storage_alignment", str(_ALIGNMENT).encode())
        _zip_record(file, archive, "archive/byteorder", sys.byteorder.encode())
        for key, array in enumerate(arrays.values()):
            _zip_record(file, archive, f"archive/data/{key}", array.reshape(-1).view(np.uint8))
        _zip_record(file, archive, "archive/version", b"3\n")


def save_torch_state_dict(path: str | os.PathLike, state_dict: Mapping) -> None:
    """Writes a whole state_dict as a PyTorch checkpoint file, without PyTorch.

    By suffix: ``.safetensors`` writes safetensors; ``.pt``, ``.pth`` and ``.bin`` write the zip
    archive ``torch.save`` writes, which ``torch.load(path, weights_only=True)`` reads back into a
    state_dict for ``module.load_state_dict``. :func:`load_torch_state_dict` gives back the same
    names, dtypes and bits.

    Args:
      path: the file to write (replaced if it exists).
      state_dict: ``{name: array}``; numpy, jax or torch arrays of a dtype torch has (float16/32/64,
        bfloat16, int8-64, uint8, bool).

    >>> import os, tempfile, numpy as np, jlstm
    >>> path = os.path.join(tempfile.mkdtemp(), "steps.pt")
    >>> jlstm.save_torch_state_dict(path, {"steps": np.arange(3)})
    >>> jlstm.load_torch_state_dict(path)["steps"]
    array([0, 1, 2])
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"save_torch_state_dict: expected a mapping of names to arrays, got "
            f"{type(state_dict).__name__}"
        )
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"save_torch_state_dict: names must be str, got {name!r}")
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"save_torch_state_dict: the name {name!r} holds a lone surrogate, which "
                    "UTF-8 (and so a checkpoint file) cannot store; rename it"
                ) from None
        array = np.asarray(_to_numpy(value), order="C")  # (ascontiguousarray makes 0-d 1-d)
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(
                f"save_torch_state_dict: {name!r} has dtype {array.dtype}; a PyTorch file holds "
                f"{_SUPPORTED}; cast it first"
            )
        arrays[name] = array
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix == ".safetensors":
        _replace(path, lambda temporary: safetensors.numpy.save_file(arrays, temporary))
    elif suffix in (".pt", ".pth", ".bin"):
        _replace(path, lambda temporary: _write_zip(temporary, arrays))
    else:
        raise ValueError(
            f"save_torch_state_dict: cannot tell the format of {os.fspath(path)!r} from its suffix "
            f"{suffix!r}; use .safetensors, or .pt/.pth/.bin for torch.save's format"
        )


def _replace(path, write) -> None:
    """Calls ``write(temporary)`` on a new file beside ``path``, flushes it to disk and renames it
    over ``path``, so that ``path`` is the old file or the whole new one, never a part of either.
    On failure the temporary file is removed. The file gets the mode ``torch.save`` would give it:
    the old file's, or for a new one 0o666 less the umask (the kernel applies it to os.open's)."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    while True:
        temporary = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        mode = os.fstat(fd).st_mode
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(path).st_mode
        os.close(fd)
        write(temporary)  # safetensors replaces the file with one of mode 0o600
        os.chmod(temporary, stat.S_IMODE(mode))
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save_torch(path: str | os.PathLike, params: Mapping, *, prefix: str = "") -> None:
    """Writes jlstm params as a PyTorch checkpoint file (``.pt``/``.pth``/``.bin`` or
    ``.safetensors``), named as the torch module under ``prefix`` would name them.

    Args:
      path: the file; its suffix picks the format, as in :func:`save_torch_state_dict`.
      params: a params dict of jlstm (``jlstm.init_lstm``, ``jlstm.load_torch``, ...).
      prefix: put before every name, e.g. ``"lstm."`` for the ``lstm`` submodule of a model.

    The file loads with ``torch.load(path, weights_only=True)`` into ``module.load_state_dict``
    (strict) and with :func:`load_torch` bit for bit, bfloat16 included.

    >>> import os, tempfile, jax, jlstm
    >>> params = jlstm.init_lstm(jax.random.key(0), 3, 4, proj_size=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "lstm.pt")
    >>> jlstm.save_torch(path, params, prefix="lstm.")
    >>> list(jlstm.load_torch_state_dict(path))
    ['lstm.weight_ih_l0', 'lstm.weight_hh_l0', 'lstm.bias_ih_l0', 'lstm.bias_hh_l0', 'lstm.weight_hr_l0']
    """
    state_dict = to_torch(params)
    # to_torch widens bfloat16 to float32 for torch.from_numpy; a file holds bfloat16 itself.
    widened = {k for k in state_dict if np.asarray(params[k]).dtype == jnp.bfloat16}
    save_torch_state_dict(
        path,
        {prefix + k: v.astype(jnp.bfloat16) if k in widened else v for k, v in state_dict.items()},
    )
