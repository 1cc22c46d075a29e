"""Committed results, and the pages rendered from them.

    make bench      # a full run replaces benchmarks/results/<cpu>.json, then renders the pages
    make render     # BENCHMARKS.md, README's Performance block, experiments/README.md's outputs
    python -m experiments.results record mnist runs/mnist   # a finished run -> experiments/results
    python -m experiments.results --check                    # exit 1 where a page is out of date

A page shows a figure only from a result file that a command wrote: ``benchmarks/results/`` holds
one ``make bench`` run per CPU model (its JSON as written, with date, commit, versions, CPU flags
and the load marks of every measurement; a new run on that CPU replaces the file), and
``experiments/results/`` one finished run per training program (its final metrics and training
time, with the CPU, versions, commit and date). The rendered parts of a page sit between
``<!-- rendered: NAME -->`` and ``<!-- end rendered -->``; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks" / "results"
TRAIN_DIR = ROOT / "experiments" / "results"
# Training programs whose expected output is rendered: name -> (make target, module).
PROGRAMS = {
    "mnist": ("make train-mnist", "experiments.mnist"),
    "regression": ("make train-regression", "experiments.regression"),
}
# Config fields that say where a run reads and writes, not what it computes.
PLACES = {"workdir", "data_dir", "restart", "keep_checkpoints", "devices", "distributed"}
BENCH_MODES = ("fwd", "train")
# The cases of a full make bench run (experiments.bench.cases.BENCH_CASES, which imports nothing
# heavy), the only runs that replace a CPU's result file.
FULL_CASES = ("mnist", "medium", "long", "wide", "gru", "small", "small-gru")
MARKER = re.compile(r"(<!-- rendered: (?P<name>[\w-]+) -->\n)(.*?)(<!-- end rendered -->)", re.S)


# --------------------------------------------------------------------------------------- the CPU


def cpu_info(cpuinfo: str) -> dict:
    """CPU model and the vector/matrix extensions that decide GEMM speed, from /proc/cpuinfo text.

    >>> cpu_info("model name\\t: AMD EPYC 9R14\\nflags\\t\\t: fpu avx2 avx512f\\n")
    {'model': 'AMD EPYC 9R14', 'avx2': True, 'avx512f': True, 'amx': False}
    """
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in cpuinfo.splitlines()[::-1])
    )  # reversed, so the first processor's values win
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "amx": "amx_tile" in flags,
    }


def this_cpu() -> dict:
    path = Path("/proc/cpuinfo")
    return cpu_info(path.read_text() if path.exists() else "")


def describe_cpu(cpu: dict) -> str:
    """One line: the model and its extensions.

    >>> describe_cpu({"model": "X", "avx2": True, "avx512f": False, "amx": False})
    'X (AVX2, no AVX-512F, no AMX)'
    """
    names = {"avx2": "AVX2", "avx512f": "AVX-512F", "amx": "AMX"}
    features = ", ".join(("" if cpu[k] else "no ") + v for k, v in names.items())
    return f"{cpu['model']} ({features})"


def cpu_slug(cpu: dict) -> str:
    """A CPU's result file name: the model without trademarks, and its extensions (two CPUs that
    report the same model name but differ in AVX-512 get two files).

    >>> cpu_slug({"model": "Intel(R) Xeon(R) Processor", "avx2": True, "avx512f": True, "amx": True})
    'intel-xeon-processor-avx2-avx512f-amx'
    >>> cpu_slug({"model": "AMD EPYC 7R13 Processor", "avx2": True, "avx512f": False, "amx": False})
    'amd-epyc-7r13-processor-avx2'
    """
    model = re.sub(r"\((r|tm)\)", "", cpu["model"].lower())
    words = re.findall(r"[a-z0-9]+", model) + [k for k in ("avx2", "avx512f", "amx") if cpu[k]]
    return "-".join(words) or "unknown-cpu"


def _git(*cmd: str) -> str:
    try:
        done = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return ""
    return done.stdout.strip()


def commit() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files differ from it."""
    dirty = _git("status", "-s", "--untracked-files=no")
    return _git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


# ------------------------------------------------------------------------------------- the bench


def is_full_run(record: dict) -> bool:
    """Whether a ``make bench`` record is a whole run on CPU: every case, both modes, the GEMM peak
    and the MNIST epoch, not ``--quick``; only such a run replaces a CPU's result file.

    >>> full = {"config": {"quick": False, "cases": list(FULL_CASES), "modes": ["fwd", "train"],
    ...     "torch_device": "cpu"}, "gemm_peak": {}, "mnist_epoch": {}}
    >>> is_full_run(full), is_full_run(full | {"mnist_epoch": None})
    (True, False)
    """
    config = record["config"]
    return (
        not config.get("quick")
        and tuple(config.get("cases", ())) == FULL_CASES
        and tuple(config.get("modes", ())) == BENCH_MODES
        and config.get("torch_device") == "cpu"
        and record.get("gemm_peak") is not None
        and record.get("mnist_epoch") is not None
    )


def save_bench(record: dict, directory: Path) -> Path | None:
    """Writes a full run's record as its CPU's result file, replacing an earlier one; returns the
    path, or None (and writes nothing) for a partial run."""
    if not is_full_run(record):
        return None
    cpu = {"model": record["device"]["cpu"], **record["device"]["cpu_features"]}
    path = Path(directory) / f"{cpu_slug(cpu)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_dir(directory: Path) -> list[dict]:
    """The result files of a folder, newest first, each with its file name under ``"file"``."""
    records = []
    for path in sorted(Path(directory).glob("*.json")):
        records.append(json.loads(path.read_text()) | {"file": path.name})
    return sorted(records, key=lambda r: r.get("date", ""), reverse=True)


def _marks(record: dict) -> str:
    return ("*" if record.get("loaded") else "") + ("~" if record.get("slow") else "")


def _ms(record: dict, impl: str) -> float | None:
    return record["impls"].get(impl, {}).get("median_s")


def _ratio(record: dict, a: str, b: str) -> float | None:
    ta, tb = _ms(record, a), _ms(record, b)
    return ta / tb if ta and tb else None


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _shape(shape: dict) -> str:
    d = "bi" if shape["bidirectional"] else "uni"
    sizes = (shape["batch"], shape["seq_len"], shape["input_size"], shape["hidden_size"])
    return f"{', '.join(map(str, sizes))}, {shape['num_layers']}, {d}"


def _short_cpu(record: dict) -> str:
    model = re.sub(r"\((R|TM)\)", "", record["device"]["cpu"]).replace("  ", " ")
    feats = record["device"]["cpu_features"]
    ext = "AVX-512" if feats.get("avx512f") else "AVX2" if feats.get("avx2") else "no AVX2"
    return f"{model.strip()} ({record['device']['cpu_count']} cores, {ext})"


def provenance(record: dict) -> str:
    v = record["versions"]
    threads = record.get("threads", {}).get("torch_intra_op")
    torch_threads = f" ({threads} threads)" if threads else ""
    return (
        f"`make bench` of {record['date'][:10]}, commit {record['git_commit']}; jax {v['jax']}, "
        f"torch {v['torch']}{torch_threads}, flax {v['flax']}, Python {v['python']}"
    )


def cpu_section(record: dict) -> str:
    """BENCHMARKS.md's part for one CPU: provenance, the timing table, the GEMM peak, the MNIST
    epoch, the train-step memory and the marks."""
    feats = record["device"]["cpu_features"]
    cpu = describe_cpu({"model": record["device"]["cpu"], **feats})
    out = [f"### {cpu}, {record['device']['cpu_count']} cores", "", provenance(record) + "."]
    peak = record.get("gemm_peak")
    if peak:
        libs = ", ".join(f"{k} {v:.0f}" for k, v in peak["square"].items())
        out[-1] += f" Float32 GEMM peak {peak['peak_gflops']:.0f} GFLOP/s ({libs})."
    out += [
        "",
        "| case (B, T, I, H, layers, dir) | mode | torch ms | jlstm ms | jlstm/torch | jlstm/flax "
        "| fused/torch | torch % of peak | jlstm % of peak | jlstm after torch / alone | marks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        pct = [_f(r.get(k) and r[k] * 100, ".0f") for k in ("torch_of_peak", "jlstm_of_peak")]
        out.append(
            f"| {r['case']} ({_shape(r['shape'])}) | {r['mode']} "
            f"| {_f(_ms(r, 'torch') and _ms(r, 'torch') * 1e3, '.2f')} "
            f"| {_f(_ms(r, 'jlstm') and _ms(r, 'jlstm') * 1e3, '.2f')} "
            f"| {_f(_ratio(r, 'jlstm', 'torch'), '.2f')} | {_f(_ratio(r, 'jlstm', 'flax'), '.2f')} "
            f"| {_f(_ratio(r, 'jlstm-fused', 'torch'), '.2f')} | {pct[0]} | {pct[1]} "
            f"| {_f(_ratio(r, 'jlstm-after-torch', 'jlstm'), '.2f')} | {_marks(r)} |"
        )
    epoch = record.get("mnist_epoch")
    if epoch:
        out += [
            "",
            f"A whole MNIST training epoch ({epoch['batches']} batches of {epoch['batch']}): torch "
            f"{epoch['torch']['median_s']:.2f} s, jlstm {epoch['jlstm']['median_s']:.2f} s "
            f"(jlstm/torch {epoch['ratio_jlstm_torch']:.2f}){' ' + _marks(epoch) if _marks(epoch) else ''}.",
        ]
    memory = record.get("peak_memory") or {}
    if memory:
        labels = list(dict.fromkeys(k for row in memory.values() for k in row))
        out += ["", "Memory of one train step, MiB beyond its inputs:", ""]
        out += ["| case | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for name, row in memory.items():
            out.append(f"| {name} | " + " | ".join(_f(row.get(k), ".1f") for k in labels) + " |")
    timed = record["results"] + ([epoch] if epoch else [])
    marked = sum(bool(_marks(r)) for r in timed)
    out += [
        "",
        f"{marked} of {len(timed)} measurements marked (`*` under load, `~` while the machine ran "
        "slow)."
        if marked
        else f"None of the {len(timed)} measurements is marked.",
    ]
    return "\n".join(out)


def render_bench_tables(records: list[dict]) -> str:
    if not records:
        return "No result is committed yet: `make bench` on a quiet machine writes one.\n"
    return "\n\n".join(cpu_section(r) for r in records) + "\n"


def render_readme_performance(records: list[dict]) -> str:
    """README's Performance block: one sentence per CPU and a table of jlstm/torch per case."""
    if not records:
        return (
            "No benchmark result is committed yet; `make bench` measures your machine "
            "([BENCHMARKS.md](BENCHMARKS.md)).\n"
        )
    lines = []
    for record in records:
        by_mode = {
            m: [
                x for r in record["results"] if r["mode"] == m if (x := _ratio(r, "jlstm", "torch"))
            ]
            for m in BENCH_MODES
        }
        spans = [
            f"{min(v):.2f}–{max(v):.2f} (median {statistics.median(v):.2f}) {what}"
            for m, what in zip(BENCH_MODES, ("for inference", "for a training step"), strict=True)
            if (v := by_mode[m])
        ]
        v = record["versions"]
        lines.append(
            f"On an {_short_cpu(record)}, jlstm takes {' and '.join(spans)} of the time of "
            f"torch's `nn.LSTM`/`nn.GRU`, over the {len(by_mode['fwd'])} benchmark cases (one "
            f"`make bench` run of {record['date'][:10]}, jax {v['jax']}, torch {v['torch']}):"
        )
    if len(records) == 1:
        head = "| case (B, T, I, H, layers, dir) | jlstm/torch fwd | jlstm/torch train |"
    else:
        head = "| case | " + " | ".join(f"{_short_cpu(r)} fwd | train" for r in records) + " |"
    rows = [head, "|---" * (1 + 2 * len(records)) + "|"]
    shapes = {r["case"]: r["shape"] for rec in records for r in rec["results"]}
    for case, shape in shapes.items():
        cells = []
        for rec in records:
            got = {r["mode"]: r for r in rec["results"] if r["case"] == case}
            for mode in BENCH_MODES:
                r = got.get(mode)
                ratio = r and _ratio(r, "jlstm", "torch")
                cells.append(_f(ratio, ".2f") + (_marks(r) if r else ""))
        name = f"{case} ({_shape(shape)})" if len(records) == 1 else case
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------- training runs


def run_command(program: str, config: dict) -> str:
    """The make command that runs ``config``: the program's target and the flags that differ from
    its defaults (where a run reads and writes left out)."""
    target, module = PROGRAMS[program]
    defaults = {
        f.name: f.default for f in dataclasses.fields(importlib.import_module(module).Config)
    }
    flags = []
    for name, value in config.items():
        if name in PLACES or defaults.get(name) == value:
            continue
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return target + (f' ARGS="{" ".join(flags)}"' if flags else "")


def record_training(program: str, workdir: Path, at_commit: str | None = None) -> dict:
    """A finished run's figures (its ``summary.json``) with the CPU, versions, commit and date;
    ``at_commit`` names the commit the run was made at where that is not this checkout's."""
    summary_path = Path(workdir) / "summary.json"
    if not summary_path.exists():
        raise SystemExit(f"{summary_path} not found: record a finished run's work dir")
    summary = json.loads(summary_path.read_text())
    metrics = {
        k: summary[k] for k in ("test_accuracy", "eval_mse", "epochs", "steps") if k in summary
    }
    import jax

    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for name in ("flax", "optax"):
        versions[name] = importlib.import_module(name).__version__
    finished = datetime.datetime.fromtimestamp(summary_path.stat().st_mtime, datetime.timezone.utc)
    return {
        "program": program,
        "command": run_command(program, summary["config"]),
        "metrics": metrics,
        "train_seconds": summary["train_seconds"],
        "device": summary.get("device"),
        "cpu": this_cpu(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "versions": versions,
        "git_commit": at_commit or commit(),
        "date": finished.date().isoformat(),
        "config": summary["config"],
    }


def render_training(records: list[dict]) -> str:
    """A table of the recorded runs: command, result, training time, machine, provenance."""
    if not records:
        return "No run is recorded yet (`python -m experiments.results record PROGRAM WORKDIR`).\n"
    lines = ["| command | result | training time | machine | measured |", "|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: list(PROGRAMS).index(r["program"])):
        m = r["metrics"]
        if "test_accuracy" in m:
            result = f"{m['test_accuracy']:.2%} test accuracy after {m['epochs']} epochs"
        else:
            result = f"eval MSE {m['eval_mse']:.2e} after {m['steps']} steps"
        cpu = re.sub(r"\((R|TM)\)", "", r["cpu"]["model"]).strip()
        v = r["versions"]
        lines.append(
            f"| `{r['command']}` | {result} | {r['train_seconds']:.0f} s | {cpu}, "
            f"{r['cpu_count']} cores | {r['date']}, commit {r['git_commit']}, jax {v['jax']} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- pages


def blocks(bench_dir: Path = BENCH_DIR, train_dir: Path = TRAIN_DIR) -> dict[str, str]:
    """Every rendered block, by name."""
    bench, training = load_dir(bench_dir), load_dir(train_dir)
    rendered = {
        "benchmark-tables": render_bench_tables(bench),
        "performance": render_readme_performance(bench),
    }
    for program in PROGRAMS:
        runs = [r for r in training if r["program"] == program]
        rendered[f"training-{program}"] = render_training(runs)
    return rendered


def fill(text: str, rendered: dict[str, str]) -> str:
    """``text`` with every rendered block replaced by its new content.

    >>> fill("a\\n<!-- rendered: x -->\\nold\\n<!-- end rendered -->\\nb", {"x": "new\\n"})
    'a\\n<!-- rendered: x -->\\nnew\\n<!-- end rendered -->\\nb'
    """

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in rendered:
            raise ValueError(f"unknown rendered block {name!r}; known: {sorted(rendered)}")
        return match[1] + rendered[name] + match[4]

    return MARKER.sub(replace, text)


PAGES = ("BENCHMARKS.md", "README.md", "experiments/README.md")


def render(root: Path = ROOT, rendered: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Each page's committed text and its rendering, by path relative to ``root``."""
    rendered = blocks() if rendered is None else rendered
    pages = {}
    for page in PAGES:
        text = (root / page).read_text()
        pages[page] = (text, fill(text, rendered))
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 where a page is out of date")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="write a finished training run's result file")
    rec.add_argument("program", choices=list(PROGRAMS))
    rec.add_argument("workdir", type=Path)
    rec.add_argument("--commit", help="the commit the run was made at (default: this checkout's)")
    args = parser.parse_args(argv)
    if args.command == "record":
        record = record_training(args.program, args.workdir, args.commit)
        path = TRAIN_DIR / f"{args.program}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    stale = []
    for page, (text, new) in render().items():
        if new != text:
            stale.append(page)
            if not args.check:
                (ROOT / page).write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `make render`", file=sys.stderr)
        return 1
    print(("rendered " + ", ".join(stale)) if stale else "pages up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
