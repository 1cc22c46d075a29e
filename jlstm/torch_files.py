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

Safety. ``pickle.load`` runs whatever callables a file names, so the pickle is read by a restricted
unpickler that allows only the globals torch's own ``torch.load(weights_only=True)`` needs for a
state_dict (the three tensor rebuild functions, the ten storage types, ``collections.OrderedDict``;
plain containers need no globals) and returns jlstm's own inert stand-ins for them; torch is never
imported. Any other global (``os.system``, ``builtins.exec``, a pickled ``nn.Module``'s classes) is
refused before it is looked up, so nothing from the file runs. Everything else a crafted or damaged
file could use is checked before it is trusted: the zip's member sizes against the file size and
their CRC-32s, the pickle's size and memo indices (a memo index sets the size of an array the C
unpickler allocates), each tensor's extent against its storage, and the total size of the arrays
the views expand to. Any problem is one ``ValueError`` naming the file.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import zipfile
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
    """Stands in for an allowed callable of the pickle. A NamedTuple has no ``__dict__`` and cannot
    be assigned to, so the pickle's BUILD opcode cannot alter it."""

    name: str

    def __call__(self, *args):
        return _CALLABLES[self.name](*args)


def _check_ints(what: str, values, *, dims: bool) -> None:
    if dims and not isinstance(values, tuple):
        raise _Refused(f"a tensor's {what} is {type(values).__name__}, not a tuple")
    for value in values if dims else (values,):
        if type(value) is not int or value < 0:
            raise _Refused(f"a tensor's {what} holds {value!r}, not a non-negative int")


def _rebuild_tensor(storage, offset, shape, stride) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    _check_ints("storage offset", offset, dims=False)
    _check_ints("size", shape, dims=True)
    _check_ints("stride", stride, dims=True)
    if len(shape) != len(stride):
        raise _Refused(f"a tensor has size {shape} but stride {stride}")
    return _Tensor(storage, offset, shape, stride)


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, hooks, metadata=None):
    _check_hooks(requires_grad, hooks)
    if metadata:  # torch's conjugate/negative bits and the like: not plain tensor data
        raise _Refused(f"a tensor carries metadata {metadata!r}, which jlstm does not interpret")
    return _rebuild_tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, requires_grad, hooks) -> _Tensor:
    _check_hooks(requires_grad, hooks)
    if not isinstance(data, _Tensor):
        raise _Refused(f"a parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _check_hooks(requires_grad, hooks) -> None:
    if not isinstance(requires_grad, bool) or not isinstance(hooks, dict) or hooks:
        raise _Refused("a tensor has backward hooks or a non-bool requires_grad")


def _ordered_dict(*args) -> collections.OrderedDict:
    if args:  # pickle writes OrderedDict() and then its items (SETITEMS)
        raise _Refused("collections.OrderedDict is called with arguments")
    return collections.OrderedDict()


_CALLABLES = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": _ordered_dict,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals a state_dict needs, to stand-ins; storages are named, not read."""

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in _CALLABLES:
            return _Global(qualified)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _Refused(
            f"data.pkl references the global {qualified!r}, which is refused: jlstm reads only "
            "tensors and containers of them (what torch.load(weights_only=True) allows) and runs "
            "no code from a file; a whole pickled model (torch.save(model)) must be re-saved as "
            "torch.save(model.state_dict(), path)"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and pid[2].isascii()
            and pid[2].isalnum()
            and isinstance(pid[3], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise _Refused(
                f"data.pkl has the persistent id {pid!r:.200}; expected ('storage', "
                "<torch storage type>, key, location, numel)"
            )
        _, storage_type, key, _, numel = pid
        return _Storage(key, _STORAGE_DTYPES[storage_type.name], numel)


def _check_memo(pkl: bytes) -> None:
    """Rejects memo indices beyond the pickle's opcode count before the C unpickler sizes its memo
    array by them (one ``LONG_BINPUT 2**31`` would make it allocate and zero 32 GiB)."""
    count, largest = 0, -1
    for opcode, arg, _ in pickletools.genops(pkl):
        count += 1
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            largest = max(largest, arg)
    if largest >= count:
        raise _Refused(f"data.pkl stores memo entry {largest} but has only {count} opcodes")


def _walk(root, max_chars: int) -> dict[str, _Tensor]:
    """The tensors of a (possibly nested) state_dict, keyed by dotted path as torch names them.

    Nested dicts, lists and tuples are descended (a checkpoint ``{"model": sd, "epoch": 3}`` gives
    ``model.<name>``); plain values (numbers, strings, None) are left out. Iterative, visiting each
    container once and building at most ``max_chars`` characters of names, so that neither a cyclic
    or deeply nested pickle nor one that shares a long key many times can recurse, loop or swell.
    """
    if not isinstance(root, dict):
        raise _Refused(f"data.pkl holds a {type(root).__name__}, not a state_dict (a dict)")
    containers = (dict, collections.OrderedDict, list, tuple)
    tensors, seen, stack, chars = {}, set(), [("", root)], 0
    while stack:
        path, node = stack.pop()
        if isinstance(node, _Tensor):
            if path in tensors:
                raise _Refused(f"two tensors are named {path!r}")
            tensors[path] = node
            continue
        where = repr(path) if path else "the state_dict"
        if node and id(node) in seen:
            raise _Refused(f"{where} is reached twice (a cyclic pickle)")
        seen.add(id(node))
        children = []
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise _Refused(f"{where} has a {type(key).__name__} key")
            if type(value) in containers or isinstance(value, _Tensor):
                name = f"{path}.{key}" if path else str(key)
                chars += len(name)
                if chars > max_chars:
                    raise _Refused(f"the state_dict's names add up to over {max_chars} characters")
                children.append((name, value))
            elif not isinstance(value, int | float | str | bytes | type(None)):
                raise _Refused(f"{where}[{key!r}] is a {type(value).__name__}, not a tensor")
        stack.extend(reversed(children))
    return tensors


class _Archive:
    """One torch zip checkpoint: its members checked against the file, read and CRC-checked once."""

    def __init__(self, file, size: int):
        self.zip = zipfile.ZipFile(file)
        infos = self.zip.infolist()
        if not infos:
            raise _Refused("the zip archive is empty")
        self.prefix = infos[0].filename.split("/")[0] + "/"
        self.members, self.stored_bytes = {}, 0
        for info in infos:
            name = info.filename
            if not name.startswith(self.prefix) or name in self.members:
                raise _Refused(f"member {name!r} is not in one archive folder {self.prefix!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Refused(f"member {name!r} is compressed; torch.save stores members as is")
            if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
                raise _Refused(f"member {name!r} points outside the archive ({size} bytes)")
            self.members[name] = info
            if name.startswith(f"{self.prefix}data/"):
                self.stored_bytes += info.file_size
        self.storages: dict[str, np.ndarray] = {}

    def read(self, record: str, *, limit: int | None = None) -> bytes | None:
        info = self.members.get(self.prefix + record)
        if info is None:
            return None
        if limit is not None and info.file_size > limit:
            raise _Refused(f"{record} has {info.file_size} bytes, more than {limit}")
        data = self.zip.read(info)  # raises BadZipFile on a CRC-32 mismatch
        if len(data) != info.file_size:
            raise _Refused(f"{record} is truncated")
        return data

    def storage(self, storage: _Storage, byteorder: str) -> np.ndarray:
        """The storage as a flat array of its dtype, in native byte order."""
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


def _array(archive: _Archive, name: str, tensor: _Tensor, byteorder: str) -> np.ndarray:
    storage = archive.storage(tensor.storage, byteorder)
    shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
    end = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    if end > storage.size if math.prod(shape) else offset > storage.size:
        raise _Refused(
            f"tensor {name!r} (offset {offset}, size {shape}, stride {stride}) points outside its "
            f"storage of {storage.size} elements"
        )
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape, [s * itemsize for s in stride], writeable=False
    )
    return np.array(view, order="C")  # a copy: C-contiguous, writable, not the file's bytes


def _read_zip(file, size: int) -> dict[str, np.ndarray]:
    archive = _Archive(file, size)
    byteorder = (archive.read("byteorder", limit=16) or b"little").decode("ascii")
    if byteorder not in ("little", "big"):
        raise _Refused(f"byteorder record is {byteorder!r}, not 'little' or 'big'")
    version = archive.read("version", limit=16)
    if version is not None and not version.strip().isdigit():
        raise _Refused(f"version record is {version!r}, not a number")
    pkl = archive.read("data.pkl", limit=_MAX_PICKLE_BYTES)
    if pkl is None:
        raise _Refused(f"the zip archive has no {archive.prefix}data.pkl: not a torch checkpoint")
    _check_memo(pkl)
    # Names take a small multiple of the pickle's bytes (it holds each key once, prefixes aside).
    tensors = _walk(_Unpickler(io.BytesIO(pkl)).load(), max_chars=16 * len(pkl) + (1 << 20))
    budget = _MAX_EXPANSION * archive.stored_bytes + _EXPANSION_ALLOWANCE
    arrays = {}
    for name, tensor in tensors.items():
        budget -= math.prod(tensor.shape) * tensor.storage.dtype.itemsize
        if budget < 0:
            raise _Refused(
                f"its tensor views expand to more than {_MAX_EXPANSION} times the "
                f"{archive.stored_bytes} bytes stored (at {name!r}); overlapping views are refused"
            )
        arrays[name] = _array(archive, name, tensor, byteorder)
    return arrays


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
        except Exception as e:  # any failure to parse untrusted bytes is the file's fault
            raise ValueError(
                f"jlstm cannot load {os.fspath(path)!r}: the file is corrupt or truncated "
                f"({type(e).__name__}: {e})"
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
        array = np.asarray(_to_numpy(value), order="C")  # (ascontiguousarray makes 0-d 1-d)
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(
                f"save_torch_state_dict: {name!r} has dtype {array.dtype}; a PyTorch file holds "
                f"{_SUPPORTED}; cast it first"
            )
        arrays[name] = array
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix == ".safetensors":
        safetensors.numpy.save_file(arrays, path)
    elif suffix in (".pt", ".pth", ".bin"):
        _write_zip(path, arrays)
    else:
        raise ValueError(
            f"save_torch_state_dict: cannot tell the format of {os.fspath(path)!r} from its suffix "
            f"{suffix!r}; use .safetensors, or .pt/.pth/.bin for torch.save's format"
        )


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
