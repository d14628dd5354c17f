"""The shared formatters and cleaners (oneday.formats): one home, so every table and file writes numbers alike."""

from __future__ import annotations

import json
import math

import numpy as np

from oneday.errors import first_line
from oneday.formats import clock_text, finite_or_none, human_count, human_flops, human_seconds, jsonable, number_or


def test_counts_seconds_and_flops() -> None:
    assert [human_count(n) for n in (7, 0.5, 172_352, 124e6, 2.1e9, 3e12)] == ["7", "0.5", "172k", "124M", "2.1B",
                                                                               "3T"]
    assert [human_seconds(s) for s in (12, 90, 28_800, 5_400)] == ["12s", "1.5m", "8h", "1.5h"]
    assert human_flops(989.4e12) == "989 TFLOP/s"
    assert [clock_text(s) for s in (-3, 59.6, 3_725)] == ["0:00", "1:00", "1:02:05"]


def test_missing_and_non_finite_values() -> None:
    assert number_or(None, ".3f") == "–" and number_or(math.nan, ".3f", "") == ""
    assert number_or(1.23456, ".2f") == "1.23"
    assert [finite_or_none(v) for v in (None, "x", math.inf, math.nan, "2.5", 3)] == [None, None, None, None, 2.5, 3.0]


def test_jsonable_is_plain_json() -> None:
    value = {"a": (1.0, math.nan), 2: {"b": np.float32(0.5), "c": math.inf}, "d": 1 / 3, "e": object}
    clean = jsonable(value, digits=4)
    assert clean == {"a": [1.0, None], "2": {"b": 0.5, "c": None}, "d": 0.3333, "e": str(object)}
    json.dumps(clean, allow_nan=False)  # no NaN/inf survive


def test_first_line_of_an_exception() -> None:
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(OSError("x" * 1000))) == 300
