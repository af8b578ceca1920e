"""The docs run as written: README.md, demo/README.md and every docs/*.md.

Every ```python block is preceded by ``<!-- runnable -->`` (the test executes it, from a scratch folder
where ``demo/`` is the checkout's, as from a clone) or by ``<!-- not-runnable: why -->`` (it needs
pretrained weights, a dataset download or a GPU). No doc names a machine path, or a file outside the
repository: the demo backbone is ``demo/vit_tiny_fmnist32.safetensors``, shipped with it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_README = ROOT / "demo" / "README.md"
DOCS = [README, DEMO_README, *sorted((ROOT / "docs").glob("*.md"))]
DEMO_FILE = "demo/vit_tiny_fmnist32.safetensors"
DEMO_FILES = (DEMO_FILE, "demo/swin_tiny_fmnist32.safetensors")
MARKER = re.compile(r"<!-- (runnable|not-runnable: [^>]+) -->\s*```python\n(.*?)```", flags=re.S)
MACHINE_PATHS = re.compile(r"(?<![\w.])/(work|root|home|Users|tmp/pytest)[/\w.-]*")


def _doc_id(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix() if doc == DEMO_README else doc.name


def python_blocks(doc: Path) -> tuple[list[str], int]:
    """(runnable blocks, number of python blocks in the doc)."""
    text = doc.read_text(encoding="utf-8")
    total = len(re.findall(r"```python\n", text))
    runnable = [code for kind, code in MARKER.findall(text) if kind == "runnable"]
    return runnable, total


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_python_block_is_marked(doc):
    text = doc.read_text(encoding="utf-8")
    marked = len(MARKER.findall(text))
    _, total = python_blocks(doc)
    assert marked == total, (
        f"{doc.name}: {total - marked} python block(s) lack <!-- runnable --> or <!-- not-runnable: why -->"
    )


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_no_machine_paths(doc):
    found = MACHINE_PATHS.findall(doc.read_text(encoding="utf-8"))
    assert not found, (
        f"{doc.name} names machine paths (use paths relative to the repository, e.g. {DEMO_FILE})"
    )


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_docs_use_the_shipped_demo_backbone(doc):
    """No file outside the repository (``../shared/...``): the backbone is the one in ``demo/``."""
    text = doc.read_text(encoding="utf-8")
    outside = re.findall(r"\.\./shared\b[\w/.-]*", text)
    assert not outside, f"{doc.name} names files outside the repository: {outside} (use {DEMO_FILE})"
    for shipped in DEMO_FILES:
        name = shipped.split("/")[-1]
        elsewhere = re.findall(r"[\w./-]*" + re.escape(name), text)
        wrong = [m for m in elsewhere if m not in (shipped, name)]
        assert not wrong, f"{doc.name} names a demo backbone as {wrong}; write {shipped}"


def test_the_demo_backbones_are_in_the_checkout():
    for shipped in DEMO_FILES:
        assert (ROOT / shipped).is_file(), f"{shipped} is missing; the docs' real-data rows need it"
    assert DEMO_README.is_file()


@pytest.mark.slow  # one Python subprocess per example
@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)[0]], ids=_doc_id)
def test_runnable_python_blocks_run(doc, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "demo").symlink_to(ROOT / "demo")  # docs name the backbone demo/..., as from a clone
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i, block in enumerate(python_blocks(doc)[0]):
        script = work / f"{doc.stem}_{i}.py"
        script.write_text(block, encoding="utf-8")
        run = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, env=env)
        assert run.returncode == 0, f"{doc.name} example {i} failed:\n{run.stderr[-2000:]}"


def test_readme_keeps_its_examples():
    assert len(python_blocks(README)[0]) >= 2, "README lost its runnable python examples"


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
