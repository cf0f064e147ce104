"""docs/tutorial.md runs as written: every python block in order in one session, then every sh block."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.DOTALL)]


@pytest.mark.real_data
@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path, mnist_cache, monkeypatch, capsys):
    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "digits").symlink_to(ROOT / "tests" / "digits")
    found = blocks(TUTORIAL.read_text())
    # a script of the reader's own: its classes live in __main__, as they do in a notebook
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    for language, code in found:
        if language == "python":
            exec(compile(code, str(TUTORIAL), "exec"), main.__dict__)
    printed = capsys.readouterr().out
    summary_shown = next(code for language, code in found if language == "")
    assert summary_shown.strip() in printed  # the table on the page is what summary prints
    assert main.run.test_acc > 0.9 and main.modern.test_acc > 0.98
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    for language, code in found:
        if language == "sh":
            for line in code.strip().splitlines():
                done = subprocess.run(line, shell=True, capture_output=True, text=True, env=env, timeout=600)
                assert done.returncode == 0, f"{line}\n{done.stderr}"
    assert (tmp_path / "runs" / "tutorial-modern.onnx").exists()
