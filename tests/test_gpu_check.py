"""bench/gpu_check.py --dry-run: every section of the GPU check runs on the CPU in seconds (CI has no GPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~20 s alone: a subprocess runs every section once

ROOT = Path(__file__).resolve().parent.parent
CLOSED_PORT = "http://127.0.0.1:9"  # MLflow unreachable: the run must not care


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    from oneday.data.prepare import prepare_data

    cache = tmp_path_factory.getbasetemp() / "oneday-plan-data-cache"  # shared with the plan tests: pydoc once
    prepare_data("builtin:pydoc", vocab_size=512, cache_dir=cache)
    out = tmp_path_factory.mktemp("gpu-check")
    report = out / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--data", "builtin:pydoc",
         "--data-cache", str(cache), "--vocab-size", "512", "--tracking-uri", CLOSED_PORT,
         "--work-dir", str(out / "work"), "--json", str(report)],
        capture_output=True, text=True, timeout=180, cwd=out,
    )
    return result, json.loads(report.read_text()) if report.exists() else {}


def test_dry_run_passes_every_section(dry_run) -> None:
    result, report = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DRY RUN done" in result.stdout and "all sections passed" in result.stdout
    assert set(report["sections"]) == {"probe", "sdpa", "nan", "shapes", "plan", "chosen", "run", "parallel"}
    assert all(s["status"] == "ok" for s in report["sections"].values())
    assert "not checked on the CPU" in result.stdout  # what needs CUDA says so


def test_dry_run_figures(dry_run) -> None:
    _, report = dry_run
    sections = report["sections"]
    assert sections["probe"]["device"] == "cpu" and sections["probe"]["measured_matmul_flops"] > 0
    assert sections["sdpa"]["flash_only_step"] is True
    nan = sections["nan"]
    assert nan["skipped_steps"] == [3, 5] and nan["optimizer_step"] == [4] and nan["weights_finite"]
    assert all(nan["unchanged_across_poisoned_step"].values())
    timed = [v for k, v in sections["shapes"].items() if isinstance(v, dict)]
    assert len(timed) == 3 and all(t["tokens_per_s"] > 0 and t["micro_batch"] >= 1 for t in timed)
    run = sections["run"]
    assert run["tokens"] > 0 and math.isfinite(run["final_val_loss"])
    parallel = sections["parallel"]  # two gloo ranks stand for two GPUs
    assert parallel["ranks"] == 2 and 0 < parallel["efficiency"] <= 1 and parallel["together_seconds"] > 0
