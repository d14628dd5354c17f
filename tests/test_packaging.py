"""The built wheel holds every module of the source tree, under the names the code imports.

The top-level folders install as sub-packages of `oneday` (setup.py finds every package below them). A package
left out of the wheel breaks a non-editable install only (`pip install .`), never the editable one the tests run
on, so this builds the wheel from a copy of the tree and compares its modules with the tree's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"oneday": "oneday", "oneday.planner": "planner", "oneday.runner": "runner", "oneday.models": "models",
         "oneday.studies": "studies"}
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "mlruns",
                              "mlflow.db", ".ruff_cache", ".pytest_cache")


def source_modules() -> set[str]:
    """Every module below the mapped roots that is inside a package (a chain of __init__.py up to the root)."""
    found = set()
    for package, folder in ROOTS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if all((base.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
                found.add(".".join((package, *parts)).removesuffix(".__init__"))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("src") / "oneday"
    shutil.copytree(ROOT, tree, ignore=SKIP)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(tree)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("oneday-*.whl")
    return built


def test_wheel_holds_every_module_of_the_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    in_wheel = {name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
                for name in names if name.endswith(".py")}
    expected = source_modules()
    assert "oneday.commands.plan" in expected and "oneday.planner.make" in expected  # the walk itself works
    assert in_wheel == expected, f"missing: {sorted(expected - in_wheel)}; extra: {sorted(in_wheel - expected)}"


def test_wheel_carries_the_license_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "oneday = oneday.cli:main" in entry_points
    assert "oneday/__main__.py" in names  # `python -m oneday`, e.g. `torchrun -m oneday run plan.json`


def test_python_dash_m_runs_the_cli() -> None:
    """`python -m oneday` is the CLI (so `torchrun -m oneday run plan.json` needs no path to the script)."""
    done = subprocess.run([sys.executable, "-m", "oneday", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("oneday ")
