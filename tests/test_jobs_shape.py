"""jobs/*.py are thin entry points: short, and importing only raypref.experiments and raypref.cli
(the import-linter contract cannot see jobs/, which is not a package, so this test checks it)."""
import ast
from pathlib import Path

import pytest

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py"))
ALLOWED = ("raypref.experiments", "raypref.cli")
STANDARD = {"sys", "pathlib", "__future__"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_there_are_jobs():
    assert {"dpo.py", "reward.py", "serve.py", "simulate.py", "soups.py", "sweep.py"} <= {p.name for p in JOBS}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_is_a_thin_entry_point(path):
    assert len(path.read_text().splitlines()) <= 30, f"{path.name}: job logic belongs in raypref/experiments"
    for name in _imports(path):
        ok = name in STANDARD or any(name == a or name.startswith(a + ".") for a in ALLOWED)
        assert ok, f"{path.name} imports {name}: a job may import only {ALLOWED} (and sys, pathlib)"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_runs_through_run_job(path):
    assert "run_job(main)" in path.read_text()


def test_no_method_is_picked_by_an_algo_branch():
    """Methods are looked up by name in the registry (raypref.recipes), never by `algo == ...`."""
    root = Path(__file__).resolve().parents[1] / "raypref"
    branches = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
                for i, line in enumerate(p.read_text().splitlines(), 1) if "algo ==" in line]
    assert not branches, f"algo branches (use recipes.recipe(name)): {branches}"
