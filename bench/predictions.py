"""Are the plan's predictions true? Plan, run, and compare predicted with achieved loss and tokens.

For each corpus and CPU budget: `oneday plan` then `oneday run` (subprocesses, as a user would run them), and a
table of what the plan said against what the run did: the presented loss and its basis (calibrated, law, or a
bound when the published law is above the data's unigram entropy), the band and whether the achieved
validation loss fell inside it, predicted vs achieved tokens (goal: within 2%), the calibration's cost as a
share of the budget, and the machine's load (`os.getloadavg`) when the run ended.

    python bench/predictions.py --data ../shared/data/tinyshakespeare.txt --data builtin:pydoc --minutes 5 15
    python bench/predictions.py --data builtin:pydoc --minutes 3 --workdir /tmp/bp     # the smallest case
    python bench/predictions.py --data ../shared/data --minutes 5 15 --calibrate-hours 0.25   # calibrated first

`--calibrate-hours H` first calibrates each corpus: `oneday plan` for the longest budget, then `oneday tune
plan.json --calibrate --hours H`, which fits the law on the plan's recipe at smaller widths and keeps the fit with
the prepared data; every plan that follows on that data reuses it and presents a calibrated prediction. The
table then gives that calibration's cost as a share of each case's budget (it is paid once per corpus and
tokenizer, whatever the number of plans that reuse it).

Corpora outside this repository are passed as paths (the development machines keep English text in
`../shared/data`; read its README). The whole grid costs about the sum of its budgets plus one minute a case;
on a loaded machine pass --threads 1. Writes only under --workdir (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONEDAY = str(Path(sys.executable).with_name("oneday"))


def _slug(data: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in Path(data.split(":")[-1]).stem)[:40]


def one_case(data: str, minutes: float, *, workdir: Path, threads: int | None, calibration_seconds: float = 0.0
             ) -> dict:
    """Plan and run one (corpus, budget); the row of the table."""
    case = workdir / f"{_slug(data)}-{minutes:g}m"
    case.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    plan_path = case / "plan.json"
    started = time.monotonic()
    subprocess.run([ONEDAY, "plan", "--minutes", f"{minutes:g}", "--data", data, "--device", "cpu",
                    "--out", str(plan_path), "--cache-dir", str(workdir / "cache")],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    plan_seconds = time.monotonic() - started
    command = [ONEDAY, "run", str(plan_path), "--run-dir", str(case / "run"),
               "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    if threads:
        command += ["--threads", str(threads)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    plan = json.loads(plan_path.read_text())
    summary = json.loads((case / "run" / "summary.json").read_text())
    pred = plan["prediction"]
    low, high = sorted(pred["loss_band"])
    achieved = summary["final_val_loss"]
    # a plan that calibrated on its own says what it cost; a reused calibration cost what the bench measured
    calibration_seconds = float(plan.get("provenance", {}).get("calibration_seconds") or calibration_seconds)
    return {
        "data": data, "minutes": minutes,
        "shape": f"{plan['model']['n_layer']}×{plan['model']['d_model']}",
        "basis": pred.get("basis", "law"), "predicted": pred["loss"], "law_loss": pred.get("law_loss", pred["loss"]),
        "band": [low, high], "achieved": achieved,
        "in_band": achieved is not None and low <= achieved <= high,
        "predicted_tokens": pred["tokens"], "tokens": summary["tokens"],
        "tokens_ratio": summary["tokens"] / pred["tokens"],
        "calibration_share": calibration_seconds / (minutes * 60.0),
        "plan_seconds": round(plan_seconds, 1), "load": [round(x, 2) for x in os.getloadavg()],
    }


def calibrate(data: str, hours: float, *, minutes: float, workdir: Path, threads: int | None) -> dict:
    """`oneday plan` for `minutes`, then `oneday tune --calibrate --hours`: the fit is kept with the prepared data."""
    case = workdir / f"{_slug(data)}-calibration"
    case.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run([ONEDAY, "plan", "--minutes", f"{minutes:g}", "--data", data, "--device", "cpu",
                    "--out", str(case / "plan.json"), "--cache-dir", str(workdir / "cache")],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    started = time.monotonic()
    subprocess.run([ONEDAY, "tune", str(case / "plan.json"), "--calibrate", "--hours", f"{hours:g}",
                    "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"], check=True, stdout=subprocess.DEVNULL,
                   env=env)
    seconds = time.monotonic() - started
    fit = json.loads((case / "plan.calibration.json").read_text())
    return {"data": data, "hours": hours, "seconds": round(seconds, 1), "points": len(fit["points"]),
            "E": fit["E"], "A": fit["A"], "B": fit["B"]}


def _table(rows: list[dict]) -> str:
    head = (f"{'data':<28} {'min':>4} {'shape':>7} {'basis':>10} {'predicted':>9} {'band':>13} {'achieved':>8} "
            f"{'in':>3} {'tokens pred/got':>19} {'ratio':>6} {'calib':>6} {'load(1m)':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shown = f"<{r['predicted']:.2f}" if r["basis"] == "bound" else f"{r['predicted']:.3f}"
        achieved = "—" if r["achieved"] is None or not math.isfinite(r["achieved"]) else f"{r['achieved']:.3f}"
        lines.append(
            f"{r['data'][-28:]:<28} {r['minutes']:>4g} {r['shape']:>7} {r['basis']:>10} {shown:>9} "
            f"{r['band'][0]:>6.2f}–{r['band'][1]:<6.2f} {achieved:>8} {'yes' if r['in_band'] else 'no':>3} "
            f"{r['predicted_tokens']:>9,}/{r['tokens']:<9,} {r['tokens_ratio']:>6.3f} "
            f"{r['calibration_share']:>6.1%} {r['load'][0]:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a corpus (path or builtin:pydoc); repeat")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 15.0], help="CPU budgets (default 5 15)")
    parser.add_argument("--workdir", type=Path, default=None, help="where plans, runs and the cache go")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--calibrate-hours", type=float, default=None,
                        help="first calibrate each corpus with `oneday tune --calibrate --hours` this long")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-predictions-"))
    rows, calibrations = [], []
    for data in args.data:
        calibration_seconds = 0.0
        if args.calibrate_hours:
            c = calibrate(data, args.calibrate_hours, minutes=max(args.minutes), workdir=workdir, threads=args.threads)
            calibrations.append(c)
            calibration_seconds = c["seconds"]
            print(f"{data}: calibrated in {c['seconds']:.0f} s on {c['points']} runs: E {c['E']:.3f}, A {c['A']:.4g}, "
                  f"B {c['B']:.4g}", flush=True)
        for minutes in args.minutes:
            rows.append(one_case(data, minutes, workdir=workdir, threads=args.threads,
                                 calibration_seconds=calibration_seconds))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"calibrations": calibrations, "cases": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
