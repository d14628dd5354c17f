"""Every bad input a new user is likely to try, as `oneday` subprocesses: a table of input → exit code → message.

Each case runs in a fresh sandbox folder (its own working directory and `ONEDAY_CACHE`, with a valid plan,
a finished tiny run and a small corpus next to it where the case needs them). A case passes when `oneday`
exits with the expected code (2 for a user error), prints exactly one `error:` line and no traceback, and
leaves the sandbox as it found it (no new, changed or removed files, apart from what the case says it may
write). Prints the table and the counts; exits 1 if any case fails.

    python bench/bad_inputs.py              # ~2 minutes on 2 CPU cores
    python bench/bad_inputs.py -k sample    # only the cases whose name holds "sample"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oneday.plan import save_plan  # noqa: E402
from tests.factories import make_plan  # noqa: E402

ONEDAY = str(Path(sys.executable).with_name("oneday"))


@dataclass
class Case:
    name: str
    args: list[str]
    setup: Callable[[Path, Path], None] | None = None  # (sandbox, shared fixtures) -> None
    code: int = 2
    may_write: tuple[str, ...] = ()  # sandbox paths (globs) the case may create or change
    env: dict[str, str] = field(default_factory=dict)


def _listing(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file():
            out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
        elif path.is_dir():
            out[rel] = "dir"
    return out


def _write(path: Path, text: str) -> Callable[[Path, Path], None]:
    def setup(sandbox: Path, shared: Path) -> None:
        target = sandbox / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return setup


def _plan_json(**edits: object) -> str:
    raw = json.loads(make_plan().to_json())
    for dotted, value in edits.items():
        node = raw
        *parents, key = dotted.split("__")
        for parent in parents:
            node = node[parent]
        node[key] = value
    return json.dumps(raw)


def _copy_shared(name: str, as_name: str | None = None) -> Callable[[Path, Path], None]:
    def setup(sandbox: Path, shared: Path) -> None:
        source, target = shared / name, sandbox / (as_name or name)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    return setup


def _both(*setups: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(sandbox: Path, shared: Path) -> None:
        for one in setups:
            one(sandbox, shared)
    return setup


def _truncate(rel: str) -> Callable[[Path, Path], None]:
    def setup(sandbox: Path, shared: Path) -> None:
        path = sandbox / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


def cases() -> list[Case]:
    plan = _write(Path("plan.json"), make_plan().to_json())
    user_folder = _write(Path("mine/final/notes.txt"), "precious")
    return [
        # -- plan ------------------------------------------------------------------------------------------
        Case("plan without a budget", ["plan", "--data", "builtin:pydoc"]),
        Case("plan --minutes abc", ["plan", "--minutes", "abc", "--data", "builtin:pydoc"]),
        Case("plan --hours -1", ["plan", "--hours", "-1", "--data", "builtin:pydoc"]),
        Case("plan --hours nan", ["plan", "--hours", "nan", "--data", "builtin:pydoc"]),
        Case("plan --hours 1e9", ["plan", "--hours", "1e9", "--data", "builtin:pydoc"]),
        Case("plan --hours and --minutes", ["plan", "--hours", "1", "--minutes", "5", "--data", "builtin:pydoc"]),
        Case("plan missing data file", ["plan", "--minutes", "5", "--data", "nope.txt"]),
        Case("plan unknown builtin", ["plan", "--minutes", "5", "--data", "builtin:nope"]),
        Case("plan empty corpus", ["plan", "--minutes", "5", "--data", "empty.txt"], _write(Path("empty.txt"), "")),
        Case("plan --device tpu", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--device", "tpu"]),
        Case("plan --device cuda without GPU", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--device",
                                                "cuda"]),
        Case("plan --seq-len 0", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--seq-len", "0"]),
        Case("plan --vocab-size 10", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--vocab-size", "10"]),
        Case("plan --name ../x", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--name", "../x"]),
        Case("plan --out into a missing folder", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--out",
                                                  "missing/plan.json"]),
        Case("plan --out is a folder", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--out", "."]),
        Case("plan --explain missing", ["plan", "--explain", "nope.json"]),
        Case("plan --calibration garbage", ["plan", "--minutes", "5", "--data", "builtin:pydoc", "--calibration",
                                            "cal.json"], _write(Path("cal.json"), "{not json")),
        Case("plan --no-such-option", ["plan", "--no-such-option"]),
        # -- data ------------------------------------------------------------------------------------------
        Case("data prepare --vocab-size 1e9", ["data", "prepare", "--data", "builtin:pydoc", "--vocab-size",
                                               "1000000000"]),
        Case("data prepare --vocab-size 0", ["data", "prepare", "--data", "builtin:pydoc", "--vocab-size", "0"]),
        Case("data prepare missing tokenizer", ["data", "prepare", "--data", "builtin:pydoc", "--tokenizer",
                                                "nope/"]),
        Case("data prepare jsonl without text column", ["data", "prepare", "--data", "rows.jsonl"],
             _write(Path("rows.jsonl"), '{"a": 1}\n{"a": 2}\n')),
        Case("data prepare binary file", ["data", "prepare", "--data", "blob.txt"],
             lambda s, _: (s / "blob.txt").write_bytes(bytes(range(256)) * 100)),
        Case("data prepare cache is a file", ["data", "prepare", "--data", "builtin:pydoc", "--cache-dir",
                                              "cachefile"], _write(Path("cachefile"), "x")),
        # -- run -------------------------------------------------------------------------------------------
        Case("run missing plan", ["run", "nope.json"]),
        Case("run plan is not JSON", ["run", "plan.json"], _write(Path("plan.json"), "{oops")),
        Case("run plan with a negative lr", ["run", "plan.json"], _write(Path("plan.json"),
                                                                         _plan_json(train__lr=-1))),
        Case("run plan with an unknown key", ["run", "plan.json"], _write(Path("plan.json"),
                                                                          _plan_json(train__bogus=1))),
        Case("run plan name ../../x", ["run", "plan.json"], _write(Path("plan.json"), _plan_json(name="../../x"))),
        Case("run plan name /abs", ["run", "plan.json"], _write(Path("plan.json"), _plan_json(name="/tmp/abs"))),
        Case("run absurd model", ["run", "plan.json"], _write(Path("plan.json"), _plan_json(
            model__d_model=2**20, model__n_head=2**10, model__d_ff=2**22, model__n_layer=10**4))),
        Case("run --threads 0", ["run", "plan.json", "--threads", "0"], plan),
        Case("run --device tpu", ["run", "plan.json", "--device", "tpu"], plan),
        Case("run --device cuda without GPU", ["run", "plan.json", "--device", "cuda"], plan),
        Case("run into a user's folder", ["run", "plan.json", "--run-dir", "mine"], _both(plan, user_folder)),
        Case("run --force into a user's final/", ["run", "plan.json", "--run-dir", "mine", "--force"],
             _both(plan, user_folder)),
        Case("run --run-dir is a file", ["run", "plan.json", "--run-dir", "afile"],
             _both(plan, _write(Path("afile"), "x"))),
        Case("run a finished run again", ["run", "run/plan.json", "--run-dir", "run"], _copy_shared("run")),
        Case("run another plan's folder", ["run", "plan.json", "--run-dir", "run"], _both(plan, _copy_shared("run"))),
        Case("run with missing data cache", ["run", "plan.json"], plan),
        # -- sample ----------------------------------------------------------------------------------------
        Case("sample missing folder", ["sample", "nope"]),
        Case("sample unfinished run", ["sample", "empty-run"], lambda s, _: (s / "empty-run").mkdir()),
        Case("sample --temperature nan", ["sample", "run", "--temperature", "nan"], _copy_shared("run")),
        Case("sample --temperature -1", ["sample", "run", "--temperature", "-1"], _copy_shared("run")),
        Case("sample --max-new-tokens 0", ["sample", "run", "--max-new-tokens", "0"], _copy_shared("run")),
        Case("sample truncated weights", ["sample", "run"],
             _both(_copy_shared("run"), _truncate("run/final/model.safetensors"))),
        # -- tune ------------------------------------------------------------------------------------------
        Case("tune missing plan", ["tune", "nope.json"]),
        Case("tune --trials 0", ["tune", "plan.json", "--trials", "0"], plan),
        Case("tune --hours 0.0001", ["tune", "run/plan.json", "--hours", "0.0001"], _copy_shared("run")),
        Case("tune --trials 4 --hours 0.0001", ["tune", "run/plan.json", "--trials", "4", "--hours", "0.0001"],
             _copy_shared("run")),
        Case("tune --storage bad URL", ["tune", "run/plan.json", "--storage", "nosuch://x"], _copy_shared("run")),
        Case("tune --storage in a missing folder", ["tune", "run/plan.json", "--storage", "nope/j.log"],
             _copy_shared("run")),
        Case("tune plan with missing data", ["tune", "plan.json"], plan),
        # -- ui / compare ----------------------------------------------------------------------------------
        Case("ui --port 0", ["ui", "--port", "0"]),
        Case("ui --port 70000", ["ui", "--port", "70000"]),
        Case("ui unreachable store", ["ui", "--tracking-uri", "http://127.0.0.1:9"]),
        Case("compare unreachable store", ["compare", "--tracking-uri", "http://127.0.0.1:9"]),
        Case("compare --sort bogus", ["compare", "--sort", "bogus"]),
        Case("compare --last 0", ["compare", "--last", "0"]),
    ]


def _fixtures(shared: Path) -> None:
    """A finished tiny run (`run/`), trained once, for the cases that need one."""
    from oneday.data.prepare import prepare_data
    from oneday.plan import DataInfo
    from oneday.runner.run import run_plan

    prepared = prepare_data("builtin:pydoc", vocab_size=512, cache_dir=shared / "cache")
    data = DataInfo(source=prepared.source, key=prepared.key, path=str(prepared.directory),
                    tokenizer=str(prepared.tokenizer_dir), vocab_size=prepared.vocab_size,
                    train_tokens=prepared.train_tokens, val_tokens=prepared.val_tokens,
                    bytes_per_token=prepared.bytes_per_token(), spec="builtin:pydoc")
    plan = replace(make_plan(data=data, max_steps=2, budget_seconds=60.0, train_seconds=60.0), name="finished")
    run_plan(plan, run_dir=shared / "run", tracking_uri=f"sqlite:///{shared / 'mlflow.db'}", threads=1)
    save_plan(plan, shared / "run" / "plan.json")


def run_case(case: Case, shared: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="oneday-bad-") as tmp:
        sandbox = Path(tmp)
        if case.setup is not None:
            case.setup(sandbox, shared)
        before = _listing(sandbox)
        env = {**os.environ, "ONEDAY_CACHE": str(sandbox / ".cache"), "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{sandbox / 'mlflow.db'}", **case.env}
        started = time.monotonic()
        proc = subprocess.run([ONEDAY, *case.args], cwd=sandbox, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        seconds = time.monotonic() - started
        after = _listing(sandbox)
        allowed = {p for p in set(after) | set(before) if any(Path(p).match(g) for g in case.may_write)}
        changed = sorted(p for p in set(after) | set(before) if before.get(p) != after.get(p) and p not in allowed)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        message = " ".join(errors[0].split()) if errors else " ".join(proc.stderr.split())[-200:]
        ok = (proc.returncode == case.code and "Traceback" not in proc.stderr and not changed
              and (len(errors) == 1 if case.code == 2 else True))
        return {"case": case.name, "code": proc.returncode, "message": message, "seconds": seconds,
                "traceback": "Traceback" in proc.stderr, "errors": len(errors), "leftovers": changed, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the cases whose name holds this text")
    args = parser.parse_args()
    selected = [c for c in cases() if args.k in c.name]
    with tempfile.TemporaryDirectory(prefix="oneday-bad-shared-") as tmp:
        shared = Path(tmp)
        _fixtures(shared)
        rows = []
        for case in selected:
            row = run_case(case, shared)
            rows.append(row)
            mark = "ok " if row["ok"] else "BAD"
            extra = f"  leftovers: {row['leftovers'][:4]}" if row["leftovers"] else ""
            extra += f"  ({row['errors']} error lines)" if row["errors"] != 1 else ""
            print(f"{mark} {row['case']:<38} → {row['code']:>3}  {row['message'][:150]}{extra}", flush=True)
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows)} cases: {len(rows) - len(bad)} ok, {len(bad)} not; "
          f"{sum(r['traceback'] for r in rows)} tracebacks, {sum(bool(r['leftovers']) for r in rows)} with leftovers")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
