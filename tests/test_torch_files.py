"""PyTorch checkpoint files without PyTorch: jlstm.load_torch / save_torch and their companions.

torch is only the oracle. The golden files in tests/golden/torch_files/ (written by torch 2.13.0,
tests/golden/make_torch_files.py) are read in a fresh interpreter where ``import torch`` fails;
round trips through the live torch run where it is installed. Hostile files (code in the pickle, a
pickled nn.Module, damaged archives, random byte flips and truncations) must each end in a
ValueError that names the file, without running anything from it.
"""

import functools
import io
import json
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlstm
from jlstm import torch_files

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GOLDEN = TESTS / "golden" / "torch_files"
DTYPES = ("float32", "float64", "float16", "bfloat16")
RECURRENT = {
    "lstm": jlstm.lstm,
    "gru": jlstm.gru,
    "rnn": functools.partial(jlstm.rnn, nonlinearity="relu"),
}
CELLS = {"lstm_cell": jlstm.lstm_cell, "gru_cell": jlstm.gru_cell, "rnn_cell": jlstm.rnn_cell}
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-13)}

# Prepended to code run by run_without_torch: `import torch` (and any torch.*) raises ImportError.
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: this check runs without torch")
sys.meta_path.insert(0, _BlockTorch())
sys.modules["torch"] = None
"""


def run_without_torch(code: str, *, cwd: Path = ROOT, timeout: float = 120) -> str:
    """Runs `code` in a fresh interpreter that cannot import torch (and checks that it did not);
    returns its stdout. A crash or a hang fails the test instead of the test process."""
    script = "\n".join(
        [
            BLOCK_TORCH,
            f"sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]",
            "import jax; jax.config.update('jax_enable_x64', True)",
            code,
            "assert sys.modules.get('torch') is None, 'torch was imported'",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return result.stdout


# --- what the golden files hold, and jlstm's forward pass of their model --------------------------


def expected(dtype: str) -> dict[str, np.ndarray]:
    """The state_dict torch saved in model_<dtype>.*, from the .npz written next to it."""
    with np.load(GOLDEN / f"model_{dtype}.npz") as data:
        names = [
            k
            for k in data.files
            if k != "torch_version" and not k.startswith(("input.", "output."))
        ]
        arrays = {k: data[k] for k in names}
    if dtype == "bfloat16":
        arrays = {k: v.view(jnp.bfloat16) if v.dtype == np.uint16 else v for k, v in arrays.items()}
    return arrays


def assert_bitwise(got: dict, want: dict, *, ordered: bool) -> None:
    assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want))
    for name, value in want.items():
        value = np.asarray(value)
        array = np.asarray(got[name])
        assert (array.dtype, array.shape) == (value.dtype, value.shape), name
        assert array.tobytes() == np.ascontiguousarray(value).tobytes(), name


def jlstm_outputs(path, tokens) -> dict[str, jax.Array]:
    """What tests/golden/make_torch_files.py's `outputs` computes with torch, from the file alone."""
    state_dict = jlstm.load_torch_state_dict(path)
    x = jnp.asarray(state_dict["embedding.weight"])[tokens]
    out = {}
    for name, fn in RECURRENT.items():
        output, h_n = fn(jlstm.load_torch(path, prefix=f"{name}."), x)
        out[f"output.{name}"] = output
        out[f"output.{name}.h_n"] = h_n[0] if name == "lstm" else h_n  # the LSTM's h, not c
    for name, fn in CELLS.items():
        h = fn(jlstm.load_torch(path, prefix=f"{name}."), x[0])
        out[f"output.{name}"] = h[0] if name == "lstm_cell" else h
    linear = state_dict["linear.weight"], state_dict["linear.bias"]
    out["output.logits"] = out["output.lstm"] @ linear[0].T + linear[1][None, None]
    return out


def check_golden() -> int:
    """Every golden file read bitwise, and the model run on it as torch ran it. Returns the count
    of files read; called in a fresh interpreter without torch."""
    count = 0
    for dtype in DTYPES:
        want = expected(dtype)
        for suffix in (".pt", ".safetensors"):
            path = GOLDEN / f"model_{dtype}{suffix}"
            # safetensors sorts its tensors; torch.save keeps the state_dict's order.
            assert_bitwise(jlstm.load_torch_state_dict(path), want, ordered=suffix == ".pt")
            params = jlstm.load_torch(path, prefix="lstm.")
            assert_bitwise(
                params, {k[5:]: v for k, v in want.items() if k.startswith("lstm.")}, ordered=True
            )
            if dtype in TOLERANCE:
                with np.load(GOLDEN / f"model_{dtype}.npz") as data:
                    torch_out = {k: data[k] for k in data.files if k.startswith("output.")}
                    tokens = data["input.tokens"]
                got = jlstm_outputs(path, tokens)
                assert sorted(got) == sorted(torch_out)
                for name, value in torch_out.items():
                    np.testing.assert_allclose(got[name], value, err_msg=name, **TOLERANCE[dtype])
            count += 1
    return count


def test_golden_files_read_without_torch():
    assert run_without_torch("import test_torch_files as t; print(t.check_golden())").split() == [
        "8"
    ]


def test_golden_files_hold_views_of_shared_storages():
    """The fixture covers what it claims: views share a storage, one at an offset."""
    with zipfile.ZipFile(GOLDEN / "model_float32.pt") as archive:
        storages = [n for n in archive.namelist() if "/data/" in n]
    state_dict = expected("float32")
    assert len(storages) == len(state_dict) - 2
    np.testing.assert_array_equal(state_dict["linear_weight_t"], state_dict["linear.weight"].T)
    np.testing.assert_array_equal(
        state_dict["embedding_window"], state_dict["embedding.weight"][2:, 1:]
    )
    kinds = {str(v.dtype) for v in state_dict.values()}
    assert kinds == {"float32", "int64", "int32", "int16", "int8", "uint8", "bool"}


def test_porting_guide_example_runs_without_torch(tmp_path):
    """The porting guide's file example, run where torch cannot be imported, gives torch's logits."""
    guide = (ROOT / "docs" / "porting.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.DOTALL)
    example = [b for b in blocks if "jlstm.load_torch(" in b and "save_torch" in b]
    assert len(example) == 1, "docs/porting.md: expected one example that loads and saves a file"
    golden = tmp_path / "tests" / "golden" / "torch_files"
    golden.mkdir(parents=True)
    (golden / "model_float32.pt").write_bytes((GOLDEN / "model_float32.pt").read_bytes())
    check = f"""
import numpy as np
with np.load({str(GOLDEN / "model_float32.npz")!r}) as data:
    np.testing.assert_allclose(logits, data["output.logits"], rtol=1e-5, atol=1e-6)
for saved in ("lstm.safetensors", "model.pt"):
    again = jlstm.load_torch(saved, prefix="lstm.")
    assert all(np.array_equal(again[k], params[k]) for k in params)
print("ok")
"""
    assert run_without_torch(example[0] + check, cwd=tmp_path).split() == ["ok"]


# --- jlstm writes, jlstm reads ----------------------------------------------------------------------


def init_all(dtype) -> dict[str, dict[str, jax.Array]]:
    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        "lstm": jlstm.init_lstm(keys[0], 3, 4, 2, bidirectional=True, proj_size=2),
        "gru": jlstm.init_gru(keys[1], 3, 4),
        "rnn": jlstm.init_rnn(keys[2], 3, 4, nonlinearity="relu"),
        "lstm_cell": jlstm.init_lstm_cell(keys[3], 3, 4),
        "gru_cell": jlstm.init_gru_cell(keys[4], 3, 4, bias=False),
        "rnn_cell": jlstm.init_rnn_cell(keys[5], 3, 4),
    }
    return {m: {k: v.astype(dtype) for k, v in p.items()} for m, p in params.items()}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_then_load_is_bitwise(tmp_path, suffix, dtype):
    for module, params in init_all(jnp.dtype(dtype)).items():
        path = tmp_path / f"{module}{suffix}"
        jlstm.save_torch(path, params, prefix=f"model.{module}.")
        assert_bitwise(jlstm.load_torch(path, prefix=f"model.{module}."), params, ordered=True)
        whole = jlstm.load_torch_state_dict(path)
        assert list(whole) == [f"model.{module}.{k}" for k in params] or suffix == ".safetensors"
    path = tmp_path / f"whole{suffix}"
    jlstm.save_torch_state_dict(path, expected(dtype))
    assert_bitwise(
        jlstm.load_torch_state_dict(path), expected(dtype), ordered=suffix != ".safetensors"
    )


EDGES = {
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 3), np.float32),
    "transposed": np.arange(6, dtype=np.float16).reshape(3, 2).T,  # written contiguous
    "mask": np.array([True, False]),
    "long": np.arange(70_000, dtype=np.int8),
    "bf16": jnp.full((2, 2), 1.5, jnp.bfloat16),
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_edge_shapes_round_trip(tmp_path, suffix):
    jlstm.save_torch_state_dict(tmp_path / f"edges{suffix}", EDGES)
    got = jlstm.load_torch_state_dict(tmp_path / f"edges{suffix}")
    assert_bitwise(got, EDGES, ordered=suffix == ".pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_reads_edge_shapes(torch, tmp_path, suffix):
    jlstm.save_torch_state_dict(tmp_path / f"edges{suffix}", EDGES)
    assert_bitwise(
        torch_arrays(torch, torch_load(torch, tmp_path / f"edges{suffix}")), EDGES, ordered=False
    )


def local_headers(path: Path) -> dict[str, tuple[int, bytes]]:
    """Each member's data offset and local extra field (zipfile reports the central ones)."""
    data = path.read_bytes()
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            at = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
            extra = data[at + 30 + name_len : at + 30 + name_len + extra_len]
            headers[info.filename] = (at + 30 + name_len + extra_len, extra)
    return headers


@pytest.mark.parametrize("zip64", [False, True], ids=["zip32", "zip64"])
def test_pt_layout_is_torchs(tmp_path, monkeypatch, zip64):
    """Members as torch.save writes them: one archive folder, stored, data 64-byte aligned (also
    with the zip64 size fields of records over 1 GiB, forced here for small ones)."""
    if zip64:
        monkeypatch.setattr(torch_files, "_ZIP64_ABOVE", -1)
    path = tmp_path / "model.pt"
    state_dict = expected("float32")
    jlstm.save_torch_state_dict(path, state_dict)
    headers = local_headers(path)
    names = ["data.pkl", ".format_version", ".storage_alignment", "byteorder"]
    names += [f"data/{i}" for i in range(len(state_dict))] + ["version"]
    assert list(headers) == [f"archive/{n}" for n in names]
    assert all(offset % 64 == 0 for offset, _ in headers.values()), headers
    zip64_field = b"\x01\x00\x10\x00"  # header id 1, 16 bytes of sizes
    assert all((zip64_field in extra) == zip64 for _, extra in headers.values())
    with zipfile.ZipFile(path) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        assert archive.read("archive/byteorder") == sys.byteorder.encode()
        assert archive.read("archive/version") == b"3\n"
    assert_bitwise(jlstm.load_torch_state_dict(path), state_dict, ordered=True)


def test_big_endian_archive_is_byteswapped(tmp_path):
    """A byteorder record of 'big' (torch.save on a big-endian machine) gives the same values."""
    state_dict = expected("float64")
    jlstm.save_torch_state_dict(tmp_path / "little.pt", state_dict)
    itemsizes = [v.dtype.itemsize for v in state_dict.values()]  # jlstm writes data/0, data/1, ...

    def to_big_endian(name, data):
        if name == "byteorder":
            return b"big"
        if name.startswith("data/"):
            return np.frombuffer(data, f"u{itemsizes[int(name[5:])]}").byteswap().tobytes()
        return data

    (tmp_path / "big.pt").write_bytes(copied(tmp_path / "little.pt", to_big_endian))
    assert_bitwise(jlstm.load_torch_state_dict(tmp_path / "big.pt"), state_dict, ordered=True)


# --- torch on the other side (where it is installed) ----------------------------------------------


def golden_script():
    from golden import make_torch_files

    return make_torch_files


TOKENS = [[1, 6], [0, 3], [5, 5], [2, 4]]  # (seq_len, batch), as in the golden files


def torch_arrays(torch, state_dict) -> dict[str, np.ndarray]:
    """torch tensors as numpy, bfloat16 included, bit for bit."""
    as_numpy = functools.partial(golden_script().as_numpy, torch)
    arrays = {k: as_numpy(v) for k, v in state_dict.items()}
    bf16 = {k for k, v in state_dict.items() if v.dtype == torch.bfloat16}
    return {k: v.view(jnp.bfloat16) if k in bf16 else v for k, v in arrays.items()}


def assert_same_outputs(torch, model, path, dtype) -> None:
    if dtype not in TOLERANCE:  # torch's CPU half-precision kernels round differently
        return
    with torch.no_grad():
        want = golden_script().outputs(torch, model, torch.tensor(TOKENS))
    got = jlstm_outputs(path, np.array(TOKENS))
    for name in got:
        np.testing.assert_allclose(got[name], want[name], err_msg=name, **TOLERANCE[dtype])


def torch_load(torch, path: Path) -> dict:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_loads_what_jlstm_writes(torch, tmp_path, suffix, dtype):
    """jlstm's files load strictly into the torch modules, bit for bit, and compute the same."""
    params = init_all(jnp.dtype(dtype))
    state_dict = expected(dtype)  # embedding, linear and buffers; the recurrent modules from jlstm
    for module, p in params.items():
        state_dict |= {f"{module}.{k}": v for k, v in p.items()}
    path = tmp_path / f"model{suffix}"
    jlstm.save_torch_state_dict(path, state_dict)
    model = golden_script().make_model(torch, getattr(torch, dtype))
    model.load_state_dict(torch_load(torch, path), strict=True)
    assert_bitwise(torch_arrays(torch, model.state_dict()), state_dict, ordered=False)
    assert_same_outputs(torch, model, path, dtype)
    for module, p in params.items():  # a single module's params, without a prefix
        jlstm.save_torch(path, p)
        getattr(model, module).load_state_dict(torch_load(torch, path), strict=True)
        assert_bitwise(torch_arrays(torch, getattr(model, module).state_dict()), p, ordered=True)


@pytest.mark.parametrize("how", ["state_dict", "keep_vars", "protocol_4", "safetensors"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_jlstm_reads_what_torch_writes(torch, tmp_path, how, dtype):
    """torch.save'd state dicts (of tensors, of Parameters, in pickle protocol 4) and safetensors
    read bit for bit, and jlstm computes what torch computes from them."""
    torch.manual_seed(1)
    model = golden_script().make_model(torch, getattr(torch, dtype))
    state_dict = model.state_dict(keep_vars=how == "keep_vars")
    path = tmp_path / ("model.safetensors" if how == "safetensors" else "model.pt")
    if how == "safetensors":
        import safetensors.torch

        copies = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
        safetensors.torch.save_file(copies, path)
    else:
        torch.save(state_dict, path, pickle_protocol=4 if how == "protocol_4" else 2)
    got = jlstm.load_torch_state_dict(path)
    assert_bitwise(got, torch_arrays(torch, state_dict), ordered=how != "safetensors")
    assert_same_outputs(torch, model, path, dtype)


def test_nested_training_checkpoint(torch, tmp_path):
    """{"model": ..., "optimizer": ..., "epoch": ...}: tensors under dotted names, the rest left out."""
    model = golden_script().make_model(torch, torch.float32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.tensor(TOKENS)).sum().backward()
    optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    got = jlstm.load_torch_state_dict(tmp_path / "checkpoint.pt")
    want = {f"model.{k}": v for k, v in torch_arrays(torch, checkpoint["model"]).items()}
    for i, state in checkpoint["optimizer"]["state"].items():
        want |= {f"optimizer.state.{i}.{k}": v for k, v in torch_arrays(torch, state).items()}
    assert_bitwise(got, want, ordered=False)
    params = jlstm.load_torch(tmp_path / "checkpoint.pt", prefix="model.lstm.")
    assert_bitwise(params, torch_arrays(torch, model.lstm.state_dict()), ordered=True)


# --- hostile and damaged files ----------------------------------------------------------------------


class Global(tuple):
    """`module.name`, written as a GLOBAL opcode by `dumps`."""


class Call(tuple):
    """(callable, args), written as REDUCE."""


class PersistentId(tuple):
    """A persistent id, written as BINPERSID."""


def opcodes(value) -> bytes:
    """A minimal protocol-2 pickler that writes any globals without importing them."""
    if isinstance(value, Global):
        return b"c" + f"{value[0]}\n{value[1]}\n".encode()
    if isinstance(value, Call):
        return opcodes(value[0]) + opcodes(tuple(value[1])) + b"R"
    if isinstance(value, PersistentId):
        return opcodes(tuple(value)) + b"Q"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
        return b"\x8a" + bytes([len(data)]) + data
    if isinstance(value, str):
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()
    if isinstance(value, tuple):
        return b"(" + b"".join(map(opcodes, value)) + b"t"
    if isinstance(value, dict):
        return b"}(" + b"".join(opcodes(k) + opcodes(v) for k, v in value.items()) + b"u"
    assert value is None
    return b"N"


def dumps(value) -> bytes:
    return b"\x80\x02" + opcodes(value) + b"."


def tensor(offset=0, size=(4,), stride=(1,), *, key="0", storage="FloatStorage", numel=4, **kw):
    """torch._utils._rebuild_tensor_v2 on storage `key`, every field settable."""
    pid = PersistentId(("storage", Global(("torch", storage)), key, "cpu", numel))
    hooks = Call((Global(("collections", "OrderedDict")), ()))
    args = (pid, offset, size, stride, False, hooks)
    if "metadata" in kw:
        args += (kw["metadata"],)
    return Call((Global(("torch._utils", "_rebuild_tensor_v2")), args))


def write_archive(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch-layout zip: data.pkl, version, and `records` (default: storage 0, four float32)."""
    if records is None:
        records = {"data/0": np.arange(4, dtype=np.float32).tobytes()}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        for name, data in {"version": b"3\n", **records}.items():
            archive.writestr(f"archive/{name}", data)
    return path


def test_handwritten_archive_reads_strided_views(tmp_path):
    """The control for the hostile cases below, which change one thing of this valid file."""
    pkl = dumps(
        {
            "w": tensor(0, (2, 2), (1, 2)),
            "tail": tensor(3, (1,), (1,)),
            "empty": tensor(4, (0, 3), (3, 1)),
        }
    )
    got = jlstm.load_torch_state_dict(write_archive(tmp_path / "ok.pt", pkl))
    np.testing.assert_array_equal(got["w"], np.array([[0, 2], [1, 3]], np.float32))
    np.testing.assert_array_equal(got["tail"], np.array([3], np.float32))
    assert got["empty"].shape == (0, 3) and got["w"].flags.c_contiguous and got["w"].flags.writeable


class Reduce:
    """Pickles as a call of fn(*args): how real malicious pickles are made."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles that create `marker` when unpickled, and the global (as the file names it) that
    each must be refused for. Protocol 3 keeps Python 3's module names (2 writes __builtin__)."""
    import builtins
    import os

    touch = f"open({str(marker)!r}, 'w').close()"
    system = Reduce(os.system, f"touch {marker}")
    return {
        "os.system": (pickle.dumps(system, 2), f"{os.name}.system"),
        "builtins.exec": (pickle.dumps(Reduce(builtins.exec, touch), 3), "builtins.exec"),
        "builtins.eval": (pickle.dumps(Reduce(builtins.eval, touch), 3), "builtins.eval"),
        "subprocess.call": (
            pickle.dumps(Reduce(subprocess.call, ["touch", str(marker)]), 3),
            "subprocess.call",
        ),
        "protocol 4 STACK_GLOBAL": (pickle.dumps({"w": system}, 4), f"{os.name}.system"),
        "python 2 name": (pickle.dumps(Reduce(builtins.exec, touch), 2), "__builtin__.exec"),
        "inside a tensor": (
            dumps({"w": tensor(Call((Global(("os", "system")), (f"touch {marker}",))))}),
            "os.system",
        ),
    }


# Plain pickle, with torch's globals and storages as dummies: what the payloads above would do.
UNGUARDED = """
import io, pickle, sys
class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return (lambda *args: None) if module.startswith("torch") else super().find_class(module, name)
    def persistent_load(self, pid):
        return None
Unpickler(io.BytesIO(sys.stdin.buffer.read())).load()
"""


@pytest.mark.parametrize("name", list(payloads(Path("m"))))
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "marker"
    pkl, qualified = payloads(marker)[name]
    path = write_archive(tmp_path / "evil.pt", pkl)
    refused = f"'{path}': data.pkl references the global '{qualified}', which is refused"
    with pytest.raises(ValueError, match=re.escape(refused)):
        jlstm.load_torch_state_dict(path)
    with pytest.raises(ValueError, match=re.escape(refused)):
        jlstm.load_torch(path, prefix="lstm.")
    assert not marker.exists()
    # The control: unguarded unpickling runs the payload, so the assertion above can fail.
    subprocess.run([sys.executable, "-c", UNGUARDED], input=pkl, check=False, timeout=60)
    assert marker.exists()


def test_pickled_module_is_refused():
    with pytest.raises(
        ValueError,
        match=r"module\.pt': data.pkl references the global 'torch\.nn\.modules\.rnn\.GRU'.*torch\.save\(model\.state_dict\(\), path\)",
    ):
        jlstm.load_torch_state_dict(GOLDEN / "module.pt")


def test_legacy_format_is_refused_with_the_fix():
    with pytest.raises(
        ValueError,
        match=r"legacy\.pt': it is in torch's legacy format.*re-save it with torch >= 1\.6",
    ):
        jlstm.load_torch_state_dict(GOLDEN / "legacy.pt")


def test_bare_pickle_is_not_unpickled(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(payloads(marker)["os.system"][0])
    with pytest.raises(ValueError, match="neither a torch.save zip archive nor safetensors"):
        jlstm.load_torch_state_dict(path)
    assert not marker.exists()


def replace_record(name: str, value):
    return lambda member, data: value if member == name else data


BAD_ARCHIVES = {
    # name: (data.pkl, records (None: storage 0 of four float32), expected message)
    "storage type": (
        dumps({"w": tensor(storage="ComplexFloatStorage")}),
        None,
        "global 'torch.ComplexFloatStorage'",
    ),
    "persistent id": (
        dumps(
            {
                "w": Call(
                    (
                        Global(("torch._utils", "_rebuild_tensor")),
                        (PersistentId(("module", "x")), 0, (1,), (1,)),
                    )
                )
            }
        ),
        None,
        "persistent id ('module', 'x')",
    ),
    "storage key": (dumps({"w": tensor(key="../0")}), None, "persistent id"),
    "missing storage": (dumps({"w": tensor(key="1")}), None, "storage '1' is not in the archive"),
    "storage size": (
        dumps({"w": tensor(numel=5, size=(5,))}),
        None,
        "storage '0' holds 16 bytes but data.pkl declares 5 float32 elements",
    ),
    "offset outside": (
        dumps({"w": tensor(offset=3, size=(2,))}),
        None,
        "tensor 'w' (offset 3, size (2,), stride (1,)) points outside its storage of 4 elements",
    ),
    "stride outside": (
        dumps({"w": tensor(size=(2, 2), stride=(3, 1))}),
        None,
        "points outside its storage",
    ),
    "empty view outside": (
        dumps({"w": tensor(offset=5, size=(0,))}),
        None,
        "points outside its storage",
    ),
    "negative stride": (
        dumps({"w": tensor(size=(2,), stride=(-1,))}),
        None,
        "stride holds -1, not a non-negative int",
    ),
    "size not a tuple": (dumps({"w": tensor(size=4)}), None, "size is int, not a tuple"),
    "stride length": (
        dumps({"w": tensor(size=(2, 2), stride=(1,))}),
        None,
        "size (2, 2) but stride (1,)",
    ),
    "metadata": (dumps({"w": tensor(metadata={"conj": True})}), None, "metadata {'conj': True}"),
    "stride-0 bomb": (
        dumps({"w": tensor(size=(10**12,), stride=(0,))}),
        None,
        "expand to more than 4 times the 16 bytes stored",
    ),
    "memo bomb": (
        b"\x80\x02Nr\xff\xff\xff\x7f.",
        None,
        "stores memo entry 2147483647 where entry 0 is next",
    ),
    "not a dict": (dumps((tensor(),)), None, "data.pkl holds a tuple, not a state_dict"),
    "cycle": (b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.", None, "'a' is reached twice"),
    "uncalled global": (
        dumps({"w": Global(("collections", "OrderedDict"))}),
        None,
        "the state_dict['w'] is collections.OrderedDict, not a tensor",
    ),
    "same name twice": (
        dumps({"a.b": tensor(), "a": {"b": tensor()}}),
        None,
        "two tensors are named 'a.b'",
    ),
    "deep nesting": (  # {"a": [[[...]]]}, 20000 lists deep
        b"\x80\x02}X\x01\x00\x00\x00a" + b"]" * 20_000 + b"a" * 19_999 + b"s.",
        None,
        "is nested more than 100 containers deep",
    ),
    "long names": (  # {"nnn...": [[], [], ...]}: 20000 names of over 20000 characters each
        b"\x80\x02}X" + struct.pack("<I", 20_000) + b"n" * 20_000 + b"](" + b"]" * 20_000 + b"es.",
        None,
        "the state_dict's names add up to over",
    ),
    "storage called": (
        dumps({"w": Call((Global(("torch", "FloatStorage")), ()))}),
        None,
        "data.pkl calls torch.FloatStorage; it may call only torch._utils._rebuild_tensor_v2",
    ),
    "ordered dict args": (
        dumps({"w": Call((Global(("collections", "OrderedDict")), ((),)))}),
        None,
        "calls collections.OrderedDict with 1 arguments; it takes 0",
    ),
    "byteorder": (
        dumps({"w": tensor()}),
        {"data/0": bytes(16), "byteorder": b"middle"},
        "byteorder record is b'middle', not b'little' or b'big' (torch.load refuses it too)",
    ),
    "version": (
        dumps({"w": tensor()}),
        {"data/0": bytes(16), "version": b"three"},
        "version record is b'three'; torch.load reads versions 1 to 10",
    ),
    "bool bytes": (
        dumps({"w": tensor(storage="BoolStorage", numel=2, size=(2,))}),
        {"data/0": b"\x01\x07"},
        "bool storage '0' holds bytes other than 0 and 1",
    ),
    "two dtypes": (
        dumps({"w": tensor(), "v": tensor(storage="IntStorage")}),
        None,
        "storage '0' is used as both float32 and int32",
    ),
    "truncated pickle": (
        dumps({"w": tensor()})[:-1],
        None,
        "data.pkl is corrupt or truncated: it ends early",
    ),
}


@pytest.mark.parametrize("name", list(BAD_ARCHIVES))
def test_bad_archive_is_one_value_error(tmp_path, name):
    pkl, records, message = BAD_ARCHIVES[name]
    path = write_archive(tmp_path / "bad.pt", pkl, records)
    with pytest.raises(
        ValueError, match=re.escape(f"jlstm cannot load '{path}': ") + ".*" + re.escape(message)
    ):
        jlstm.load_torch_state_dict(path)


def test_pickle_size_is_limited(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_files, "_MAX_PICKLE_BYTES", 100)
    path = write_archive(tmp_path / "big.pt", dumps({f"w{i}": tensor() for i in range(10)}))
    with pytest.raises(ValueError, match=r"data.pkl has \d+ bytes, more than 100"):
        jlstm.load_torch_state_dict(path)


def copied(source: Path, change=lambda name, data: data, compression=zipfile.ZIP_STORED) -> bytes:
    """`source` rebuilt member by member (with fresh CRCs); change(name, data) gives each member's
    new data, or None to drop it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(buffer, "w", compression) as new:
        for info in old.infolist():
            data = change(info.filename.split("/", 1)[1], old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return buffer.getvalue()


def flip_first_tensor_byte(source: Path) -> bytes:
    data = bytearray(source.read_bytes())
    data[local_headers(source)["model_float32/data/0"][0]] ^= 1
    return bytes(data)


DAMAGED = {
    # name: (the damaged file made from the golden model_float32.pt, the message)
    "flipped tensor byte": (flip_first_tensor_byte, "Bad CRC-32 for file 'model_float32/data/0'"),
    "no data.pkl": (
        lambda source: copied(source, lambda name, data: None if name == "data.pkl" else data),
        "has no model_float32/data.pkl: not a torch checkpoint",
    ),
    "compressed": (
        lambda source: copied(source, compression=zipfile.ZIP_DEFLATED),
        "member 'model_float32/data.pkl' is compressed; torch.save stores members as is",
    ),
    "storage cut short": (
        lambda source: copied(source, lambda name, data: data[:-4] if name == "data/0" else data),
        "storage '0' holds",
    ),
    "empty file": (lambda source: b"", "neither a torch.save zip archive nor safetensors"),
    "text file": (
        lambda source: b"weight_ih_l0 = 1.0\n" * 4,
        "neither a torch.save zip archive nor safetensors",
    ),
    "truncated zip": (
        lambda source: source.read_bytes()[:9000],
        "it has no zip end record (truncated?)",
    ),
    "bad safetensors header": (
        lambda source: b"\x40\x00\x00\x00\x00\x00\x00\x00{" + b" " * 70,
        "corrupt or truncated (SafetensorError",
    ),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_file_is_one_value_error(tmp_path, name):
    damage, message = DAMAGED[name]
    path = tmp_path / "model.pt"
    path.write_bytes(damage(GOLDEN / "model_float32.pt"))
    prefix = re.escape(f"jlstm cannot load '{path}': ")
    with pytest.raises(ValueError, match=prefix + ".*" + re.escape(message)):
        jlstm.load_torch_state_dict(path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        jlstm.load_torch(tmp_path / "nothing.pt")


def test_load_torch_needs_the_right_prefix():
    with pytest.raises(ValueError, match=r"'linear_weight_t' is not a parameter name .* prefix="):
        jlstm.load_torch(GOLDEN / "model_float32.pt")
    with pytest.raises(ValueError, match="no keys start with prefix 'encoder.lstm.'"):
        jlstm.load_torch(GOLDEN / "model_float32.safetensors", prefix="encoder.lstm.")


def test_save_errors(tmp_path):
    params = jlstm.init_gru(jax.random.key(0), 2, 3)
    with pytest.raises(
        ValueError,
        match=r"cannot tell the format of '.*model.npz' from its suffix '.npz'; use .safetensors, or .pt/.pth/.bin",
    ):
        jlstm.save_torch(tmp_path / "model.npz", params)
    with pytest.raises(
        ValueError, match="'z' has dtype complex64; a PyTorch file holds float32, float64"
    ):
        jlstm.save_torch_state_dict(tmp_path / "model.pt", {"z": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="expected a mapping of names to arrays, got list"):
        jlstm.save_torch_state_dict(tmp_path / "model.pt", [np.zeros(2)])
    with pytest.raises(TypeError, match="names must be str, got 0"):
        jlstm.save_torch_state_dict(tmp_path / "model.pt", {0: np.zeros(2)})
    with pytest.raises(
        ValueError, match=r"\['embedding.weight'\] are not torch RNN parameter names"
    ):
        jlstm.save_torch(tmp_path / "model.pt", {"embedding.weight": np.zeros(2)})
    assert not list(tmp_path.iterdir())  # nothing half-written


# --- saves replace a file whole or not at all; records torch refuses -----------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, suffix):
    """A name UTF-8 cannot hold, or a disk that fills up halfway, leaves the old file whole."""
    import errno

    import safetensors.numpy

    path = tmp_path / f"model{suffix}"
    jlstm.save_torch_state_dict(path, EDGES)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="holds a lone surrogate, which UTF-8"):
        jlstm.save_torch_state_dict(path, {"w\ud800": np.zeros(2)})
    written = []

    def disk_full(file, *args):
        if hasattr(file, "write"):  # torch_files._zip_record(file, archive, name, data)
            written.append(file.write(b"partial"))
        else:  # safetensors.numpy.save_file(arrays, path)
            Path(args[0]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_files, "_zip_record", disk_full)
    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        jlstm.save_torch_state_dict(path, {"w": np.ones(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert_bitwise(jlstm.load_torch_state_dict(path), EDGES, ordered=suffix == ".pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_file_mode_follows_the_umask(tmp_path, suffix):
    """As torch.save's (open(path, "wb")): 0o666 less the umask when new, unchanged when replaced."""
    old = os.umask(0o027)
    try:
        jlstm.save_torch_state_dict(tmp_path / f"new{suffix}", EDGES)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / f"new{suffix}").stat().st_mode) == 0o640
    (tmp_path / f"new{suffix}").chmod(0o604)
    jlstm.save_torch_state_dict(tmp_path / f"new{suffix}", EDGES)
    assert stat.S_IMODE((tmp_path / f"new{suffix}").stat().st_mode) == 0o604


RECORDS = {
    # name: (change to the golden file's records, what jlstm says (None: it reads the file))
    "version 99": (replace_record("version", b"99"), "version record is b'99'; torch.load reads"),
    "version 0": (replace_record("version", b"0\n"), "version record is b'0\\n'"),
    "version 10": (replace_record("version", b"10"), None),
    "version ' 3x'": (replace_record("version", b" 3x"), None),
    "no version": (
        replace_record("version", None),
        "the zip archive has no model_float32/version record",
    ),
    "empty byteorder": (replace_record("byteorder", b""), "byteorder record is b''"),
    "byteorder 'little\\n'": (replace_record("byteorder", b"little\n"), "byteorder record is"),
    "no byteorder": (replace_record("byteorder", None), None),  # torch reads it as little-endian
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_version_and_byteorder_records_as_torch_reads_them(tmp_path, name):
    change, message = RECORDS[name]
    path = tmp_path / "model.pt"
    path.write_bytes(copied(GOLDEN / "model_float32.pt", change))
    if message is None:
        assert_bitwise(jlstm.load_torch_state_dict(path), expected("float32"), ordered=True)
    else:
        with pytest.raises(ValueError, match=re.escape(f"'{path}': {message}")):
            jlstm.load_torch_state_dict(path)


@pytest.mark.parametrize("name", list(RECORDS))
def test_torch_refuses_the_same_records(torch, tmp_path, name):
    change, message = RECORDS[name]
    path = tmp_path / "model.pt"
    path.write_bytes(copied(GOLDEN / "model_float32.pt", change))
    if message is None:
        torch.load(path, weights_only=True)
    else:
        with pytest.raises((RuntimeError, ValueError)):
            torch.load(path, weights_only=True)


# --- fuzz: every damaged file is a ValueError or reads exactly -------------------------------------


def decode_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """A reference reader: the tensors a safetensors file's header says it holds."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    dtypes = {
        "F32": np.float32,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    return {
        k: np.frombuffer(
            body[v["data_offsets"][0] : v["data_offsets"][1]], dtypes[v["dtype"]]
        ).reshape(v["shape"])
        for k, v in header.items()
    }


def same(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == want[k].dtype
        and got[k].shape == want[k].shape
        and got[k].tobytes() == want[k].tobytes()
        for k in want
    )


def fuzz(directory: str) -> dict[str, int]:
    """Random byte flips and truncations of a golden .pt and .safetensors file (fixed seed). Each
    must raise a ValueError naming the file or read exactly what the damaged bytes hold: the
    original tensors, or for safetensors (which has no checksums) a changed tensor byte. A case
    over 10 s raises TimeoutError, which fails the run."""
    import signal

    def timeout(*_):
        raise TimeoutError("a fuzz case took over 10 s")

    signal.signal(signal.SIGALRM, timeout)
    rng = np.random.default_rng(13)
    outcomes: dict[str, int] = {}
    for source, flips, cuts in [
        ("model_float32.pt", 180, 60),
        ("model_float32.safetensors", 120, 40),
    ]:
        data = (GOLDEN / source).read_bytes()
        want = jlstm.load_torch_state_dict(GOLDEN / source)
        path = Path(directory) / source
        cases = []
        for _ in range(flips):
            at, bits = int(rng.integers(len(data))), int(rng.integers(1, 256))
            cases.append(
                (f"byte {at} ^ {bits}", data[:at] + bytes([data[at] ^ bits]) + data[at + 1 :])
            )
        cases += [(f"cut at {n}", data[:n]) for n in rng.integers(len(data), size=cuts).tolist()]
        for case, damaged in cases:
            path.write_bytes(damaged)
            signal.alarm(10)
            try:
                got = jlstm.load_torch_state_dict(path)
                outcome = "unchanged" if same(got, want) else None
                if (
                    outcome is None
                    and source.endswith(".safetensors")
                    and same(got, decode_safetensors(damaged))
                ):
                    outcome = "tensor bytes changed"
                assert outcome, f"{source}, {case}: read as different tensors"
            except ValueError as e:
                assert f"'{path}'" in str(e), (case, e)
                outcome = "ValueError"
            finally:
                signal.alarm(0)
            key = f"{source}: {outcome}"
            outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


def test_fuzzed_files_are_value_errors_or_exact(tmp_path):
    output = run_without_torch(
        f"import json, test_torch_files as t; print(json.dumps(t.fuzz({str(tmp_path)!r})))",
        timeout=300,
    )
    outcomes = json.loads(output)
    assert sum(outcomes.values()) == 400, outcomes
    assert outcomes["model_float32.pt: ValueError"] > 150, outcomes
    assert outcomes["model_float32.safetensors: ValueError"] > 40, outcomes
    assert "model_float32.pt: tensor bytes changed" not in outcomes  # CRC-32 catches every flip


# --- Flax ---------------------------------------------------------------------------------------------


def test_flax_modules_take_load_torch():
    nnx = pytest.importorskip("flax.nnx")
    from jlstm import linen, nn

    path = GOLDEN / "model_float32.pt"
    params = jlstm.load_torch(path, prefix="lstm.")
    x = jax.random.normal(jax.random.key(1), (4, 2, 3))
    want = jlstm.lstm(params, x)
    module = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, rngs=nnx.Rngs(0))
    module.load_state_dict(params)
    assert_bitwise(module.state_dict(), params, ordered=True)
    for got, value in zip(jax.tree.leaves(module(x)), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, value)
    model = linen.LSTM(4, num_layers=2, bidirectional=True, proj_size=2)
    for got, value in zip(
        jax.tree.leaves(model.apply({"params": params}, x)), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(got, value)
    with pytest.raises(
        TypeError,
        match=r"LSTM.load_state_dict: expected a mapping of parameter names to arrays, got PosixPath; read a file with jlstm.load_torch\(path, prefix=...\)",
    ):
        module.load_state_dict(path)
