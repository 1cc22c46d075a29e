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
import pickle
import re
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
        out[f"output.{name}"], out[f"output.{name}.h_n"] = (
            output,
            (h_n[0] if name == "lstm" else h_n),
        )
    for name, fn in CELLS.items():
        h = fn(jlstm.load_torch(path, prefix=f"{name}."), x[0])
        out[f"output.{name}"] = h[0] if name == "lstm_cell" else h
    linear = state_dict["linear.weight"], state_dict["linear.bias"]
    out["output.logits"] = out["output.lstm"] @ linear[0].T + linear[1]
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


def test_readme_example_runs_without_torch(tmp_path):
    """The README's porting example, run where torch cannot be imported, gives torch's logits."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    example = [b for b in blocks if "jlstm.load_torch(" in b and "save_torch" in b]
    assert len(example) == 1, "README: expected one python example that loads and saves a file"
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


def rewrite(source: Path, path: Path, change) -> None:
    """Copies a zip archive member by member, replacing each member's data by change(name, data)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            new.writestr(info.filename, change(info.filename.split("/", 1)[1], old.read(info)))


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

    rewrite(tmp_path / "little.pt", tmp_path / "big.pt", to_big_endian)
    assert_bitwise(jlstm.load_torch_state_dict(tmp_path / "big.pt"), state_dict, ordered=True)
