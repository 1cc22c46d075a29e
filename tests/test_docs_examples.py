"""Every ``python`` block of README.md and of the docs pages runs: a page's blocks in order, as one
script (a later block may use what an earlier one defined), in a process of its own whose working
directory is a scratch folder (files an example writes land there; ``tests/`` is linked in for the
golden files the examples read)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_extractor_finds_the_examples():
    """The pages hold examples at all, so the test below cannot pass by finding none."""
    found = {page.name: len(blocks(page)) for page in PAGES}
    for name in ("README.md", "porting.md", "export.md", "flax.md", "performance.md"):
        assert found[name] >= 1, f"{name}: no ```python block found"
    assert blocks(Path(__file__)) == []  # no fence at a line start here, so no false positive


@pytest.mark.parametrize(
    "page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_page_examples_run(page, tmp_path):
    script = "\n".join(blocks(page))
    needs = {m for m in ("torch", "flax", "optax") if re.search(rf"\bimport {m}\b|, {m}\b", script)}
    for module in sorted(needs):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{page.name} needs {module}")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{page.name}'s examples failed:\n{done.stderr[-3000:]}"
