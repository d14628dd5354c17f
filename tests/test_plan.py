"""plan.json schema: round trip, and every kind of bad plan rejected with the field named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from oneday.errors import UserError
from oneday.plan import SCHEMA_VERSION, Plan, PlanError, load_plan, save_plan
from tests.factories import make_plan


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    return path


def test_round_trip(tmp_path: Path) -> None:
    plan = make_plan()
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    assert not [p for p in tmp_path.iterdir() if p.name != "plan.json"], "temp files left behind"


def test_flat_params_are_strings_with_dotted_keys() -> None:
    flat = make_plan().flat_params()
    assert flat["model.n_layer"] == "2"
    assert flat["train.lr"] == "0.003"
    assert flat["budget.hours"] == f"{60 / 3600:.4g}"
    assert all(isinstance(v, str) for v in flat.values())


@pytest.mark.parametrize(
    ("mutate", "field_named"),
    [
        (lambda raw: raw["model"].update(n_layr=3), "model.n_layr: unknown key"),
        (lambda raw: raw.update(extra=1), "extra: unknown key"),
        (lambda raw: raw["train"].update(lr="fast"), "train.lr: expected a number"),
        (lambda raw: raw["train"].update(lr=-1.0), "train.lr: must be in (0, 1)"),
        (lambda raw: raw["train"].update(micro_batch=0), "train.micro_batch: must be >= 1"),
        (lambda raw: raw["train"].update(micro_batch=2.5), "train.micro_batch: expected an integer"),
        (lambda raw: raw["train"].update(compile="yes"), "train.compile: expected true/false"),
        (lambda raw: raw["train"].update(cooldown_shape="exp"), "train.cooldown_shape: must be one of"),
        (lambda raw: raw["model"].update(n_head=5), "model.n_head"),
        (lambda raw: raw["model"].update(seq_len=10**6), "model.seq_len"),
        (lambda raw: raw["train"].update(seq_len=128), "train.seq_len: must equal model.seq_len"),
        (lambda raw: raw["train"].pop("lr"), "train.lr: missing"),
        (lambda raw: raw["hardware"].update(peak_flops=0), "hardware.peak_flops: must be > 0"),
        (lambda raw: raw["candidates"][0].update(tokens="many"), "candidates[0].tokens"),
        (lambda raw: raw["train"].update(warmup_fraction=0.5, cooldown_fraction=0.6), "train.cooldown_fraction"),
    ],
)
def test_bad_plans_name_the_field(tmp_path: Path, mutate, field_named: str) -> None:
    raw = make_plan().to_dict()
    mutate(raw)
    with pytest.raises(PlanError) as info:
        load_plan(_write(tmp_path, raw))
    assert field_named in str(info.value)
    assert "\n" not in str(info.value)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    raw = make_plan().to_dict()
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(PlanError, match="newer oneday"):
        load_plan(_write(tmp_path, raw))


def test_version_1_plans_still_load(tmp_path: Path) -> None:
    """Version 1 stored `train.reserve_seconds`; version 2 derives it (budget − training time)."""
    plan = make_plan()
    raw = plan.to_dict()
    raw["schema_version"] = 1
    raw["train"]["reserve_seconds"] = plan.train.budget_seconds - plan.train.train_seconds
    loaded = load_plan(_write(tmp_path, raw))
    assert loaded == plan and loaded.schema_version == SCHEMA_VERSION == 2
    assert loaded.train.reserve_seconds() == pytest.approx(10.0)
    raw["schema_version"] = 2  # in version 2 the key is unknown
    with pytest.raises(PlanError, match=r"train\.reserve_seconds: unknown key"):
        load_plan(_write(tmp_path, raw))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such plan file"):
        load_plan(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_plan(bad)


def test_plan_is_frozen_and_changed_with_replace() -> None:
    plan = make_plan()
    tuned = replace(plan, train=replace(plan.train, lr=1e-3))
    assert plan.train.lr == 3e-3 and tuned.train.lr == 1e-3
    with pytest.raises(AttributeError):
        plan.train.lr = 1.0  # type: ignore[misc]


def test_from_dict_rejects_non_object() -> None:
    with pytest.raises(PlanError, match="expected a JSON object"):
        Plan.from_dict([1, 2])
