"""Hostile checkpoint files (tests/hostile/make_hostile_files.py builds them) each end in a
ValueError naming the file, or in the right tensors, within the bound of docs/torch_file_safety.md,
without crashing: each is loaded in a child process limited in address space and time."""

import json
import subprocess
import sys
from pathlib import Path

import make_hostile_files

SCRIPT = Path(make_hostile_files.__file__)


def test_hostile_files_end_in_value_errors_within_the_bound(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(result.stdout)
    assert len(results) >= 20, results
    failed = {
        name: case
        for name, case in results.items()
        if not case["ok"]
        or case.get("peak_bytes", 0) > case["memory_bound"]
        or case.get("seconds", 0) > case["time_bound"]
    }
    assert not failed, json.dumps(failed, indent=1)
