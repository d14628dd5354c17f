"""Which benchmarks `oneday eval` runs: the default set, their chance levels, and the user's task list.

The default set holds zero-shot tasks where a ~100M-parameter model trained for a day beats chance by a margin
that shows (published small-model results: GPT-2 124M scores ~0.29–0.31 acc_norm on HellaSwag, ~0.43 on
ARC-Easy, ~0.62–0.63 on PIQA, ~0.50–0.52 on WinoGrande, ~0.33 on LAMBADA; nanoGPT/llm.c report HellaSwag,
nanochat's CORE includes all of them). Each is multiple choice (chance: 1 / number of choices), except LAMBADA,
a last-word prediction whose chance is ~0.

No lm_eval import here: names are checked against a text scan of the task files lm_eval ships, which takes
a second where building lm_eval's full task index takes 15–20 s on a small CPU machine.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from oneday.errors import UserError

DEFAULT_TASKS: tuple[str, ...] = ("hellaswag", "arc_easy", "piqa", "winogrande", "lambada_openai")

CHANCE: dict[str, float] = {
    "hellaswag": 0.25,  # 4 endings
    "arc_easy": 0.25,  # mostly 4 choices (a few have 3 or 5)
    "arc_challenge": 0.25,
    "piqa": 0.5,  # 2 solutions
    "winogrande": 0.5,  # 2 options
    "boolq": 0.5,
    "openbookqa": 0.25,
    "sciq": 0.25,
    "copa": 0.5,
    "lambada_openai": 0.0,  # the exact last word out of the whole vocabulary
    "lambada_standard": 0.0,
}
"""Accuracy by guessing, for tasks whose items could not be counted (the harness computes it for every
multiple-choice task it runs: the mean of 1 / choices over the items scored)."""

_NAME_LINE = re.compile(r"^(task|group|tag):\s*['\"]?([\w.\-]+)['\"]?\s*$", re.MULTILINE)
_TAG_LIST = re.compile(r"^tag:\s*\n((?:\s+-\s*[\w.\-]+\s*\n)+)", re.MULTILINE)


def parse_task_list(text: str | None) -> tuple[str, ...]:
    """`--tasks a,b,c` as names (or paths), the default set when not given; `UserError` for an empty list."""
    if text is None:
        return DEFAULT_TASKS
    tasks = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not tasks:
        raise UserError(f"--tasks: no task named in {text!r} (e.g. --tasks {','.join(DEFAULT_TASKS[:2])})")
    return tasks


def is_task_path(task: str) -> bool:
    """A task given as a path to a task YAML file or a folder of them (not a registered name)."""
    return task.endswith((".yaml", ".yml")) or "/" in task or Path(task).is_dir()


def task_names_in(folder: Path, *, kinds: tuple[str, ...] = ("task", "group", "tag")) -> set[str]:
    """The task, group and tag names (`kinds`) the YAML files under `folder` declare (a text scan, no YAML
    parsing)."""
    names: set[str] = set()
    for path in sorted(folder.rglob("*.y*ml")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        names.update(name for kind, name in _NAME_LINE.findall(text) if kind in kinds)
        for block in _TAG_LIST.findall(text) if "tag" in kinds else ():
            names.update(item.strip().lstrip("-").strip() for item in block.splitlines() if item.strip())
    return names


@lru_cache(maxsize=1)
def builtin_task_names() -> frozenset[str]:
    """Every task, group and tag name lm_eval ships (without importing it: its task files are found on disk)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    return frozenset(task_names_in(Path(next(iter(spec.submodule_search_locations))) / "tasks"))


def unknown_task_error(task: str, known: Sequence[str] | set[str] | frozenset[str]) -> UserError:
    """One line naming the unknown task and the closest known names."""
    close = difflib.get_close_matches(task, sorted(known), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"the default set is {','.join(DEFAULT_TASKS)}"
    return UserError(f"--tasks: unknown task {task!r} ({hint}; or give a task YAML file / folder, or --include-path)")


def check_task_path(task: str) -> Path:
    """The path of a task given as a path, `UserError` when it does not exist."""
    path = Path(task).expanduser()
    if not path.exists():
        raise UserError(f"--tasks: {task}: no such task file or folder")
    return path


def offline_data_error(task: str, exc: BaseException) -> UserError | None:
    """The one line for a task whose data is not cached while the Hugging Face hub cannot be reached (offline,
    HF_HUB_OFFLINE=1, no network); None when `exc` is something else."""
    text = str(exc)
    offline = ("OfflineModeIsEnabled" in text or "Couldn't reach" in text or "offline" in text.lower()
               or isinstance(exc, ConnectionError))
    if not offline:
        return None
    found = re.search(r"reach '([^']+)'", text)
    dataset = found.group(1) if found else None
    fetch = (f"`huggingface-cli download --repo-type dataset {dataset}`" if dataset else
             "`huggingface-cli download --repo-type dataset <its dataset>`")
    return UserError(f"task {task}: its data{f' ({dataset})' if dataset else ''} is not in the local Hugging Face "
                     f"cache and the hub cannot be reached; run the same command once online (HF_HUB_OFFLINE=0), "
                     f"or fetch it with {fetch} first")


__all__ = [
    "CHANCE",
    "DEFAULT_TASKS",
    "builtin_task_names",
    "check_task_path",
    "is_task_path",
    "offline_data_error",
    "parse_task_list",
    "task_names_in",
    "unknown_task_error",
]
