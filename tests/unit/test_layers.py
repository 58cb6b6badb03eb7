"""The layer contract (pyproject ``[tool.importlinter]``) holds, and breaks as it should: an
upward import or a cycle added to a copy of the package makes ``lint-imports`` fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(cwd / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "src" / "drsite", tmp_path / "src" / "drsite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_layers(copy: Path) -> None:
    res = _lint(copy / "src", copy)
    assert res.returncode == 0, res.stdout + res.stderr


def test_an_upward_import_breaks_the_contract(copy: Path) -> None:
    model = copy / "src" / "drsite" / "replication" / "planner.py"
    model.write_text(model.read_text() + "\n\ndef _up() -> None:\n    import drsite.vault.app  # noqa\n")
    res = _lint(copy / "src", copy)
    assert res.returncode != 0
    assert "drsite.replication is not allowed to import drsite.vault" in res.stdout


def test_a_cycle_between_siblings_breaks_the_contract(copy: Path) -> None:
    # store.wrappers imports store.contract; make contract import wrappers back
    contract = copy / "src" / "drsite" / "store" / "contract.py"
    contract.write_text(contract.read_text() + "\n\nfrom drsite.store import wrappers as _w  # noqa\n")
    res = _lint(copy / "src", copy)
    assert res.returncode != 0
    assert "No cycles are allowed in drsite.store" in res.stdout
