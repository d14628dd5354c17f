"""What a person sees: three tiny oneday runs compared in the MLflow UI, in a real headless Chromium.

Trains three tiny CPU runs with `run_plan` (different width, LR and budget) into a temporary sqlite store,
starts `oneday ui`'s lean MLflow server on it, opens the compare view of the runs with Playwright (sync API,
Debian's chromium, no browser download) and checks what a person would check:

- every run's name, side by side;
- with "Show diff only", the params that differ (model.d_model, train.lr) with each run's value, and not
  the ones that do not (train.seed);
- the `val/loss` metric with each run's final value;
- the per-step `train/loss` chart (the metric link a person clicks), one line per run.

Screenshots (tall viewport: the page scrolls inside a container) go to `$ONEDAY_SCREENSHOTS` when set, else
the test's temporary folder; their paths are printed. Needs `chromium` (apt) and `playwright` (pip); without
them the test skips locally and FAILS in CI (`CI=true`): there it must run.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.factories import make_plan, tiny_model

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("ONEDAY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 45_000  # Playwright's expect waits 5 s by default; the UI on a loaded 2-core machine needs more
RUNS = (  # name, d_model, lr, budget seconds
    ("small", 64, 3e-3, 8.0),
    ("medium", 96, 2e-3, 9.0),
    ("large", 128, 1e-3, 10.0),
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"browser test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright_api() -> Any:
    try:
        from playwright import sync_api
    except ImportError:
        unavailable("the playwright package is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_api


def _free_port() -> int:
    with socket.socket() as sock:  # an ephemeral port: never one of the ports browsers refuse
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(playwright_api, tmp_path_factory) -> Any:
    """Three trained runs in a sqlite store and `oneday ui`'s server on it (started while the runs train)."""
    import torch  # noqa: F401  imported before the first run so that its budget trains instead of importing
    from mlflow.tracking import MlflowClient

    import oneday.models.build
    import oneday.runner.loop  # noqa: F401
    from oneday.compare.runs import compare_runs
    from oneday.compare.ui import compare_url, start_ui
    from oneday.data.prepare import prepare_data
    from oneday.plan import DataInfo
    from oneday.runner.run import run_plan

    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # the store's tables, before the server and the runs
    started = time.monotonic()
    box: dict[str, Any] = {}

    def serve() -> None:
        try:
            box["server"] = start_ui(uri, port=_free_port(), ready_timeout=120)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=serve, name="ui", daemon=True)
    thread.start()
    try:
        prepared = prepare_data("builtin:pydoc", vocab_size=512, cache_dir=root / "cache")
        data = DataInfo(
            source=prepared.source, key=prepared.key, path=str(prepared.directory),
            tokenizer=str(prepared.tokenizer_dir), vocab_size=prepared.vocab_size,
            train_tokens=prepared.train_tokens, val_tokens=prepared.val_tokens,
            bytes_per_token=prepared.bytes_per_token(), spec="builtin:pydoc",
        )
        for name, d_model, lr, budget in RUNS:
            plan = make_plan(data=data, model=tiny_model(d_model=d_model, d_ff=3 * d_model), lr=lr,
                             budget_seconds=budget, train_seconds=budget,
                             eval_every_seconds=3.0, checkpoint_every_seconds=60.0)
            summary = run_plan(replace(plan, name=name), run_dir=root / "runs" / name, tracking_uri=uri, threads=1,
                               process_start=time.monotonic())
            assert summary.finished and summary.final_val_loss is not None
        trained = time.monotonic() - started
        thread.join(timeout=150)
        if "error" in box:
            raise box["error"]
        server = box["server"]
        print(f"\n3 runs trained in {trained:.0f} s; MLflow UI answered after {server.startup_seconds:.1f} s")
        comparison = compare_runs(uri, last=len(RUNS), sort="start")
        assert [r.name for r in comparison.rows] == ["large-10s-558k", "medium-9s-338k", "small-8s-172k"]
        # the links `oneday ui` printed were made when it started, while the runs were still training
        url = compare_url(server.url, [r.run_id for r in comparison.rows], [r.experiment_id for r in comparison.rows])
        yield {"server": server, "comparison": comparison, "root": root, "compare_url": url}
    finally:
        thread.join(timeout=150)
        if "server" in box:
            box["server"].stop()


@pytest.fixture(scope="module")
def page(playwright_api) -> Any:
    try:
        manager = playwright_api.sync_playwright().start()
    except Exception as exc:
        unavailable(f"playwright could not start ({exc})")
    try:
        browser = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    except Exception as exc:
        manager.stop()
        unavailable(f"chromium could not start: {str(exc).strip().splitlines()[0]}")
    playwright_api.expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1600, "height": 2600})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()
    browser.close()
    manager.stop()


def screenshot_path(root: Path, name: str) -> Path:
    folder = Path(os.environ.get("ONEDAY_SCREENSHOTS") or root)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def close_assistant(page: Any) -> None:
    """MLflow 3 opens an assistant side panel; close it so that it does not cover the comparison."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def _inside(box: dict[str, float] | None, frame: dict[str, float] | None) -> bool:
    """Whether `box` lies (vertically) within `frame`: on screen, not clipped by a scrolling container."""
    if not box or not frame:
        return False
    return box["y"] >= frame["y"] - 1 and box["y"] + box["height"] <= frame["y"] + frame["height"] + 1


def _middle(box: dict[str, float]) -> float:
    return box["y"] + box["height"] / 2


def _number(text: str) -> float:
    return float(text.strip().replace(",", ""))


def test_compare_view_shows_the_runs_side_by_side(playwright_api, page, served):
    expect = playwright_api.expect
    comparison = served["comparison"]
    rows = comparison.rows
    started = time.monotonic()
    page.goto(served["compare_url"])
    expect(page.get_by_text(f"Comparing {len(rows)} Runs from 1 Experiment")).to_be_visible()
    close_assistant(page)

    # every run's name, side by side in the run details
    for row in rows:
        expect(page.get_by_text(row.name, exact=True).first).to_be_visible()

    # the params that differ, with each run's value; an equal one disappears with "Show diff only"
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    expected = {"model.d_model": {str(r.d_model) for r in rows}, "train.lr": {str(r.lr) for r in rows}}
    assert expected == {"model.d_model": {"64", "96", "128"}, "train.lr": {"0.003", "0.002", "0.001"}}
    for key, values in expected.items():
        row = page.locator("tr.diff-row").filter(has=page.locator("th", has_text=re.compile(rf"^{re.escape(key)}$")))
        expect(row).to_be_visible()
        assert set(row.locator("td").all_inner_texts()) == values
    expect(page.locator("th", has_text=re.compile(r"^train\.seed$"))).to_have_count(0)

    # the val/loss metric, with each run's final value. The metrics table scrolls inside its own box (names
    # and values are two grids scrolled together): scroll it with the mouse wheel as a person does, until the
    # val/loss row is inside the box, then read the values beside it.
    page.get_by_role("switch", name="Metrics - Show diff only").click()
    name_cell = page.get_by_role("link", name="val/loss", exact=True)
    expect(name_cell).to_have_count(1)
    grids = page.locator(".ReactVirtualized__Grid")
    names_grid, values_grid = grids.nth(0), grids.nth(1)
    values_grid.hover()
    for _ in range(20):
        if values_grid.evaluate("grid => grid.scrollTop + grid.clientHeight >= grid.scrollHeight - 1"):
            break
        page.mouse.wheel(0, 100)
        page.wait_for_timeout(100)
    # MLflow 3.17 moves the names grid to the values grid's previous scroll position: one more (1 px) wheel
    # event brings the names level with the values, as a person's last nudge of the wheel does.
    page.mouse.wheel(0, -1)
    page.wait_for_timeout(300)
    name_box = name_cell.bounding_box()
    assert _inside(name_box, names_grid.bounding_box()), "val/loss did not scroll into view"
    beside = []
    for cell in values_grid.locator("[style*='top:']").all():
        box = cell.bounding_box()
        if box and _inside(box, values_grid.bounding_box()) and abs(_middle(box) - _middle(name_box)) < 8:
            beside.append(cell.inner_text())
    shown = sorted(_number(t) for t in beside)
    achieved = sorted(r.val_loss for r in rows)
    assert len(shown) == len(rows), beside
    assert all(math.isclose(a, b, abs_tol=2e-3) for a, b in zip(shown, achieved, strict=True)), (shown, achieved)

    shot = screenshot_path(served["root"], "compare-runs.png")
    below = page.get_by_text("Artifacts", exact=True).first.bounding_box()  # the rest is an empty preview pane
    clip = {"x": 0, "y": 0, "width": 1600, "height": min(2600, below["y"] + 40)} if below else None
    page.screenshot(path=str(shot), clip=clip)
    print(f"\ncompare view checked in {time.monotonic() - started:.1f} s; screenshot {shot}")


def test_train_loss_chart_has_one_line_per_run(playwright_api, page, served):
    expect = playwright_api.expect
    rows = served["comparison"].rows
    started = time.monotonic()
    if "compare-runs" not in page.url:
        page.goto(served["compare_url"])
        expect(page.get_by_text(f"Comparing {len(rows)} Runs from 1 Experiment")).to_be_visible()
        close_assistant(page)
    # what a person clicks: the metric's name in the compare view opens its chart, steps on the x axis
    page.get_by_role("link", name="train/loss", exact=True).click()
    expect(page).to_have_url(re.compile(r"#/metric.*metric=%22train%2Floss%22.*x_axis=step"))
    for row in rows:
        expect(page.get_by_text(f"{row.name} (train/loss)", exact=True)).to_be_visible()
    close_assistant(page)
    chart = page.locator(".js-plotly-plot")
    expect(chart).to_have_count(1)
    expect(chart.locator(".xtitle")).to_have_text("Step")
    expect(chart.locator(".scatterlayer .trace path.js-line")).not_to_have_count(0)
    # the chart's own data (Plotly keeps it on the element): MLflow draws each run's line twice (raw and
    # smoothed, on top of each other), so lines are counted by run
    traces = chart.evaluate("gd => gd.data.map(t => ({name: t.name, x: t.x, y: t.y}))")
    by_run: dict[str, list[dict[str, Any]]] = {}
    for trace in traces:
        by_run.setdefault(trace["name"], []).append(trace)
    assert sorted(by_run) == sorted(r.name for r in rows)  # one line per run, and no other
    for name, same in by_run.items():
        steps, losses = same[0]["x"], same[0]["y"]
        assert len(steps) >= 5 and steps == sorted(steps), (name, steps)
        assert all(t["x"] == steps for t in same), name
        assert losses[-1] < losses[0], (name, losses)  # it trained
    shot = screenshot_path(served["root"], "train-loss-chart.png")
    below = page.get_by_role("link", name=rows[-1].name, exact=True).last.bounding_box()  # the table under it
    clip = {"x": 0, "y": 0, "width": 1600, "height": min(2600, below["y"] + 60)} if below else None
    page.screenshot(path=str(shot), clip=clip)

    # the time axis works too: every point carries its wall-clock time; relative time stays within the budget
    page.get_by_role("radio", name="Time (Relative)").check()
    expect(page).to_have_url(re.compile(r"x_axis=relative"))
    budgets = {f"{name}-": budget for name, _, _, budget in RUNS}
    page.wait_for_function("() => document.querySelector('.js-plotly-plot').data.every(t => t.x[0] === 0)")
    for trace in chart.evaluate("gd => gd.data.map(t => ({name: t.name, x: t.x}))"):
        budget = next(b for prefix, b in budgets.items() if trace["name"].startswith(prefix))
        assert trace["x"] == sorted(trace["x"]) and 0 < trace["x"][-1] <= budget, trace
    print(f"\ntrain/loss chart checked in {time.monotonic() - started:.1f} s; screenshot {shot}")
