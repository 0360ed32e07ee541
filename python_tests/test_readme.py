"""Every ```python block of the README runs as written: each in a fresh interpreter, in
an empty working directory, with PATCHSLIM_README_SMOKE=1 set (the long blocks read it,
in plain sight, to run on fewer images and epochs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
README = TESTS.parent / "README.md"
# The README holds at least this many Python blocks: fewer means the extraction broke.
MIN_BLOCKS = 5
# The runner imports conftest (found through PYTHONPATH) before the block: where
# torchvision's compiled library does not load on this torch, timm cannot be imported
# without conftest's fix; elsewhere the fix does nothing.
RUNNER = "import runpy, sys; import conftest; runpy.run_path(sys.argv[1], run_name='__main__')"


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block."""
    return [
        (markdown.count("\n", 0, match.start()) + 1, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```$", markdown, re.DOTALL | re.MULTILINE)
    ]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_blocks_are_found():
    assert len(BLOCKS) >= MIN_BLOCKS, f"found {len(BLOCKS)} ```python blocks in {README}"


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_block_runs(line, code, tmp_path):
    script = tmp_path / f"README_md_{line}.py"
    script.write_text(code, encoding="utf-8")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    python_path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script)],
        cwd=workdir,
        env={**os.environ, "PATCHSLIM_README_SMOKE": "1", "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"the block at README.md:{line} failed:\n{result.stderr[-4000:]}"
