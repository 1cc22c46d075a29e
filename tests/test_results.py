"""The pages rendered from committed result files: the committed pages are up to date, and the
renderings say what a result file holds (provenance, ratios, marks), nothing typed by hand."""

import json

import pytest

from experiments import results
from experiments.bench import cases


def test_committed_pages_are_rendered_from_the_committed_results():
    """BENCHMARKS.md, README's Performance block and experiments/README.md's outputs are what
    ``make render`` makes of benchmarks/results and experiments/results: edit the result files (or
    the prose outside the rendered blocks), never a rendered block."""
    for page, (text, rendered) in results.render().items():
        assert "<!-- rendered: " in text, f"{page} has no rendered block"
        assert text == rendered, f"{page} differs from its rendering: run `make render`"


def test_a_full_run_is_every_benchmark_case():
    assert list(results.FULL_CASES) == cases.BENCH_CASES
    assert tuple(cases.MODES) == results.BENCH_MODES


def bench_record(date="2026-12-07T10:00:00+00:00", jlstm_s=(0.5e-3, 2e-3), slow=False) -> dict:
    """A record shaped as ``make bench`` writes it (test data, not a measurement)."""
    shape = dict(cases.CASES["mnist"]._asdict())
    rows = []
    for mode, jlstm in zip(("fwd", "train"), jlstm_s, strict=True):
        impls = {"torch": {"median_s": 1e-3}, "jlstm": {"median_s": jlstm}}
        impls |= {"jlstm-fused": {"median_s": 1.5e-3}, "flax": {"median_s": 2e-3}}
        if mode == "fwd":  # jlstm right after torch's calls: 1.1 x its time alone
            impls["jlstm-after-torch"] = {"median_s": 1.1 * jlstm}
        rows.append(
            {"case": "mnist", "mode": mode, "shape": shape, "impls": impls, "loaded": False}
            | {"slow": slow and mode == "train", "torch_of_peak": 0.25, "jlstm_of_peak": 0.5}
        )
    config = {"quick": False, "cases": cases.BENCH_CASES, "modes": cases.MODES}
    return {
        "date": date,
        "git_commit": "abc1234",
        "versions": {"python": "3.12.3", "jax": "0.10.2", "torch": "2.13.0+cpu", "flax": "0.12.8"},
        "device": {
            "cpu": "Intel(R) Xeon(R) Processor",
            "cpu_features": {"avx2": True, "avx512f": True, "amx": True},
            "cpu_count": 2,
        },
        "threads": {"torch_intra_op": 2},
        "config": config | {"torch_device": "cpu"},
        "results": rows,
        "gemm_peak": {"square": {"torch.mm": 400.0, "xla dot": 380.0}, "peak_gflops": 400.0},
        "mnist_epoch": {
            "batches": 937,
            "batch": 64,
            "torch": {"median_s": 6.0},
            "jlstm": {"median_s": 3.0},
            "ratio_jlstm_torch": 0.5,
            "loaded": False,
        },
        "peak_memory": {"long": {"torch": 114.3, "jlstm": 52.4}},
    }


def test_a_cpu_section_carries_its_provenance_and_marks():
    section = results.cpu_section(bench_record(slow=True))
    heading, _, provenance = section.splitlines()[:3]
    assert heading == "### Intel(R) Xeon(R) Processor (AVX2, AVX-512F, AMX), 2 cores"
    assert provenance.startswith("`make bench` of 2026-12-07, commit abc1234; jax 0.10.2, torch ")
    assert "Float32 GEMM peak 400 GFLOP/s (torch.mm 400, xla dot 380)" in provenance
    assert "10:00" not in section  # the day, not the time of a single run
    fwd, train = (line for line in section.splitlines() if line.startswith("| mnist ("))
    assert (
        fwd
        == "| mnist (64, 28, 28, 64, 1, uni) | fwd | 1.00 | 0.50 | 0.50 | 0.25 | 1.50 | 25 | 50 | 1.10 |  |"
    )
    assert train.endswith("| 2.00 | 2.00 | 1.00 | 1.50 | 25 | 50 | – | ~ |")  # not measured
    assert "jlstm 3.00 s (jlstm/torch 0.50)" in section
    assert "| long | 114.3 | 52.4 |" in section
    assert "1 of 3 measurements marked" in section


def test_readme_block_states_the_ratio_ranges_per_cpu():
    block = results.render_readme_performance([bench_record()])
    assert block.startswith(
        "On an Intel Xeon Processor (2 cores, AVX-512), jlstm takes 0.50–0.50 (median 0.50) for "
        "inference and 2.00–2.00 (median 2.00) for a training step of the time of torch's"
    )
    assert "(one `make bench` run of 2026-12-07, jax 0.10.2, torch 2.13.0+cpu):" in block
    assert "| mnist (64, 28, 28, 64, 1, uni) | 0.50 | 2.00 |" in block
    two = results.render_readme_performance([bench_record(), bench_record(slow=True)])
    assert "| mnist | 0.50 | 2.00 | 0.50 | 2.00~ |" in two
    assert "No benchmark result" in results.render_readme_performance([])


def test_make_bench_replaces_a_cpus_file_only_with_a_full_run(tmp_path):
    old, new = bench_record(), bench_record(date="2026-12-08T09:00:00+00:00")
    first = results.save_bench(old, tmp_path)
    assert first.name == "intel-xeon-processor-avx2-avx512f-amx.json"
    assert results.save_bench(new, tmp_path) == first
    assert json.loads(first.read_text())["date"] == new["date"]  # replaced, not appended
    partial = bench_record() | {"config": new["config"] | {"cases": ["mnist"]}}
    assert results.save_bench(partial, tmp_path / "other") is None
    assert not (tmp_path / "other").exists()
    assert [r["file"] for r in results.load_dir(tmp_path)] == [first.name]


def test_rendering_replaces_only_the_blocks_and_check_finds_stale_pages(tmp_path, monkeypatch):
    page = "intro\n<!-- rendered: performance -->\nold figures\n<!-- end rendered -->\nprose\n"
    for name in results.PAGES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(page)
    bench = tmp_path / "bench"
    results.save_bench(bench_record(), bench)
    rendered = results.blocks(bench, tmp_path / "none")
    pages = results.render(tmp_path, rendered)
    text, new = pages["README.md"]
    assert text == page and new.startswith("intro\n<!-- rendered: performance -->\nOn an Intel")
    assert new.endswith("| 0.50 | 2.00 |\n<!-- end rendered -->\nprose\n")
    with pytest.raises(ValueError, match="unknown rendered block 'nope'"):
        results.fill("<!-- rendered: nope -->\n<!-- end rendered -->", rendered)


def training_record(program, metrics, config) -> dict:
    return {
        "program": program,
        "command": results.run_command(program, config),
        "metrics": metrics,
        "train_seconds": 68.5,
        "cpu": {"model": "Intel(R) Xeon(R) Processor", "avx2": True, "avx512f": True, "amx": True},
        "cpu_count": 2,
        "versions": {"jax": "0.10.2"},
        "git_commit": "abc1234",
        "date": "2026-12-07",
    }


def test_training_rows_name_the_command_that_gives_them():
    pytest.importorskip("optax")
    mnist = {"dataset": "mnist", "hidden_size": 128, "epochs": 6, "workdir": "runs/x"}
    regression = {"cell": "gru", "steps": 1000, "workdir": "runs/regression"}
    table = results.render_training(
        [
            training_record("regression", {"eval_mse": 1.18e-5, "steps": 1000}, regression),
            training_record("mnist", {"test_accuracy": 0.9906, "epochs": 6}, mnist),
        ]
    )
    mnist_row, regression_row = table.splitlines()[2:]
    assert mnist_row.startswith(
        "| `make train-mnist` | 99.06% test accuracy after 6 epochs | 68 s |"
    )
    assert "Intel Xeon Processor, 2 cores | 2026-12-07, commit abc1234, jax 0.10.2 |" in mnist_row
    assert regression_row.startswith(
        '| `make train-regression ARGS="--cell gru"` | eval MSE 1.18e-05 after 1000 steps |'
    )
