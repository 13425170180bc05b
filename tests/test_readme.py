"""The README's examples run."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_examples_run(tmp_path):
    blocks = python_blocks()
    assert blocks
    for i, block in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(block)
        r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "prefetches," in r.stdout


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
