"""experiments/bench.py end to end on the smallest case: every implementation is checked against
torch before timing, the JSON holds medians, ratios' inputs and the train-step memory table."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")
pytest.importorskip("optax")

from experiments import bench  # noqa: E402


def test_bench_writes_checked_timings_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--cases", "mnist", "--samples", "2", "--sample-s", "0.01", "--no-epoch"]
    argv += ["--impls", "torch,jlstm,flax", "--memory-cases", "mnist", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert [(r["case"], r["mode"]) for r in report["results"]] == [
        ("mnist", "fwd"),
        ("mnist", "train"),
    ]
    for record in report["results"]:
        for name in ("torch", "jlstm", "flax"):
            impl = record["impls"][name]
            assert impl["max_rel_err"] < 1e-4 and "error" not in impl
            assert len(impl["samples_s"]) == 2 and impl["median_s"] > 0
    memory = report["peak_memory"]["mnist"]
    assert set(memory) == {"torch", "jlstm", "jlstm checkpoint_every=16", "flax"}
    assert all(v > 0 for v in memory.values()), memory
    printed = capsys.readouterr().out
    assert "| mnist | train |" in printed and "jlstm/torch" in printed
    assert "| mnist |" in printed.split("Memory of one train step")[1]


def test_bench_refuses_an_unknown_case():
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "huge"])
