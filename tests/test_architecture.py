"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) pass, and
they do fail when a stage imports its runner or a module imports one that imports it back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("closedloop", "models", "rigs", "analysis")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(executable), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "200"})


def _copy_project(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "_web"))
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "import_contracts.py", tmp_path / "tests")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [  # broken: the end of the broken contract's name
    ("closedloop/day/estimate.py", "from closedloop.day import runner", "a stage never imports the runner"),
    ("closedloop/data/store.py", "from closedloop.day import runner", "models > attack engine > helpers"),
    ("closedloop/data/layout.py", "import closedloop.data.store", "No import cycle among the project's modules"),
    ("analysis/progress.py", "from closedloop.link import client", "never talks to a rig"),
])
def test_contracts_break_on_a_forbidden_import(tmp_path, module, line, broken):
    root = _copy_project(tmp_path)
    path = root / module
    if module == "closedloop/data/layout.py":  # make store import layout, so that layout -> store closes a cycle
        store = root / "closedloop/data/store.py"
        store.write_text(store.read_text().replace("from __future__ import annotations\n",
                                                   "from __future__ import annotations\n\nimport closedloop.data.layout\n", 1))
    path.write_text(path.read_text().replace("from __future__ import annotations\n",
                                             f"from __future__ import annotations\n\n{line}\n", 1))
    result = _lint_imports(root)
    assert result.returncode != 0
    report = " ".join(result.stdout.split())
    assert f"{broken} BROKEN" in report, report[-2000:]
