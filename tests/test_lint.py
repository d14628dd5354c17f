"""The code is ruff-clean (the rules are in pyproject.toml): part of the one test command, not a separate step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT)
    assert "No module named ruff" not in done.stderr, "ruff is missing: install the dev extra (pip install -e '.[dev]')"
    assert done.returncode == 0, done.stdout + done.stderr
