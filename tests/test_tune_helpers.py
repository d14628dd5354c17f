"""Shared set-up for the tuner's tests (no tests here): tiny prepared data, a tiny plan whose proxy is 32 wide, and
fixed step timings for tests of the sizing.

The target is 2 layers × 64 wide with 2 heads of 32 (so the only narrower proxy is one head, 32 wide),
vocabulary 512, sequence length 32, micro-batch 4 (128 tokens a step). Its planned tokens are set so that the
proxy's tokens per parameter give `PROXY_STEPS` steps a trial (≈ 1 s on one CPU thread), the fewest a trial may have.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from oneday.models.spec import ModelSpec
from oneday.plan import DataInfo, Plan, save_plan
from oneday.studies.proxy import MIN_TRIAL_STEPS
from tests.factories import make_plan

PROXY_STEPS = MIN_TRIAL_STEPS
BATCH = 4
SEQ = 32


def prepared_data(tmp_path_factory: Any) -> Any:
    """builtin:pydoc with a 512-token BPE, prepared once per test session (the cache is shared)."""
    from oneday.data.prepare import prepare_data

    cache = Path(tmp_path_factory.getbasetemp()) / "oneday-tune-cache"
    return prepare_data("builtin:pydoc", vocab_size=512, cache_dir=cache)


def tiny_plan(prepared: Any, *, d_model: int = 64, n_head: int = 2, proxy_steps: int = PROXY_STEPS,
              budget_seconds: float = 600.0, lr: float = 3e-3, name: str = "tiny") -> Plan:
    model = ModelSpec(n_layer=2, d_model=d_model, n_head=n_head, d_ff=3 * d_model, vocab_size=prepared.vocab_size,
                      seq_len=SEQ)
    data = DataInfo(
        source=prepared.source, key=prepared.key, path=str(prepared.directory), tokenizer=str(prepared.tokenizer_dir),
        vocab_size=prepared.vocab_size, train_tokens=prepared.train_tokens, val_tokens=prepared.val_tokens,
        bytes_per_token=prepared.bytes_per_token(), spec="builtin:pydoc",
    )
    head = model.head_dim
    proxy = replace(model, d_model=head, n_head=1, d_ff=3 * head)
    tpp = proxy_steps * BATCH * SEQ / proxy.params_scaling()
    planned = int(tpp * model.params_scaling())
    plan = make_plan(data=data, model=model, budget_seconds=budget_seconds, train_seconds=budget_seconds * 0.8,
                     micro_batch=BATCH, lr=lr, planned_tokens=planned, planned_steps=max(1, planned // (BATCH * SEQ)),
                     eval_tokens=2048, warmup_fraction=0.02, cooldown_fraction=0.2, threads=1)
    return replace(plan, name=name)


def write_plan(plan: Plan, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_plan(plan, folder / "plan.json")


def subprocess_env() -> dict[str, str]:
    """Environment for `oneday` subprocesses: offline, one thread, a wide console."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    env.pop("ONEDAY_INJECT_NAN_AT_STEP", None)
    return env


def fake_step_timings(monkeypatch: Any) -> None:
    """Fixed step times (a width's cost in proportion to its d_model, 0.1 s to set up) instead of measured ones,
    and no warm-up: sizing becomes arithmetic, fast and the same on a busy machine. A trial of the 32-wide proxy
    then costs ~0.2 s."""
    from oneday.studies import proxy, study

    def fake_measure(model: ModelSpec, *args: Any, **kwargs: Any) -> Any:
        return proxy._Timing(step_seconds=1e-3 * model.d_model / 32, overhead_seconds=0.1)

    monkeypatch.setattr(proxy, "warm_up", lambda *args, **kwargs: None)
    monkeypatch.setattr(proxy, "measure_step", fake_measure)
    monkeypatch.setattr(study, "measure_step", fake_measure)
