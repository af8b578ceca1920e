"""The README's code examples run as written (blocks preceded by ``<!-- runnable -->``)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    pattern = rf"<!-- runnable -->\s*```{language}\n(.*?)```"
    return re.findall(pattern, text, flags=re.S)


def test_readme_python_examples_run(tmp_path):
    blocks = runnable_blocks("python")
    assert len(blocks) >= 2, "README lost its runnable python examples"
    for i, block in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(block, encoding="utf-8")
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, f"README example {i} failed:\n{run.stderr[-2000:]}"


def test_readme_setup_and_test_commands_match_ci():
    text = README.read_text(encoding="utf-8")
    setup = re.search(r"<!-- setup -->\s*```bash\n(.*?)```", text, flags=re.S)
    assert setup, "README lacks the setup block"
    commands = [line.strip() for line in setup.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    test_command = commands[1]
    assert test_command in ci.splitlines(), "the README's test command must be what .ci/run runs"
    assert "pip install" in commands[0] and "pytest" in test_command
    assert shlex.split(test_command)[:3] == ["python", "-m", "pytest"]

