"""The engine's import contract (pyproject's [tool.importlinter]) holds, and can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(tree)},
        check=False,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "listener", tree / "listener", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_engine_imports_nothing_of_openai_http_the_stub_the_demo_or_the_doctor(
    tmp_path: Path,
) -> None:
    run = _lint(_copy(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


def test_the_contract_fails_when_the_dispatcher_imports_openai(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    dispatch = tree / "listener" / "dispatch.py"
    dispatch.write_text(dispatch.read_text() + "\nimport openai  # noqa\n")
    run = _lint(tree)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "BROKEN" in run.stdout
    assert "listener.dispatch -> openai" in run.stdout


def test_the_contract_fails_when_the_worker_reaches_the_http_app_through_another_module(
    tmp_path: Path,
) -> None:
    tree = _copy(tmp_path)
    (tree / "listener" / "bridge.py").write_text("import listener.http.app  # noqa\n")
    worker = tree / "listener" / "worker.py"
    worker.write_text(worker.read_text() + "\nimport listener.bridge  # noqa\n")
    run = _lint(tree)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "listener.worker -> listener.bridge" in run.stdout
