"""What a run spends besides training steps: the one cost model of the planner's reserves and the runner's clock.

Pure Python, numbers in and seconds out. The planner reserves these costs before it turns the budget into
tokens (`planner.budget`); the runner uses the same functions for its estimates until it has timed the real
thing (the loop's first checkpoint and evaluation) and for the time it keeps free after the loop (the final
save). One model in one place, so the plan and the run agree on where the budget goes.

The constants were measured on the 2-core CPU machines this project is developed on, with margin:
- start-up (imports, model build, first step): ~6 s on a CPU, more on a GPU (CUDA context, kernel loading);
- a checkpoint writes the fp32 weights and both Adam moments (12 bytes a parameter) and fsyncs them, in a
  background thread (`runner.checkpoint`): training waits only for the snapshot, a copy to host memory taken
  at 1 GB/s (a CPU clone of 346 MB took 0.13 s on a loaded 2-core machine, `bench/checkpoint_stall.py`;
  a GPU's copy to pinned memory is faster), and for whatever of the previous write is left when the next
  checkpoint comes. The final checkpoint is written in the foreground: the whole write;
- the final save writes the fp32 weights twice (`save_pretrained`, then the copy or upload to the artifact
  store: 8 bytes a parameter), then the summary, the plot, the MLflow close and the interpreter exit;
- sustained disk writes are taken at 200 MB/s, slow enough for a network file system or a busy disk.
"""

from __future__ import annotations

import math

DISK_BYTES_PER_S = 200e6
STARTUP_SECONDS = {"cpu": 10.0, "cuda": 20.0}
CHECKPOINT_FIXED_SECONDS = 0.5
CHECKPOINT_BYTES_PER_PARAM = 12
SNAPSHOT_FIXED_SECONDS = 0.1
HOST_COPY_BYTES_PER_S = 1e9
FINAL_SAVE_FIXED_SECONDS = 1.5
FINAL_SAVE_BYTES_PER_PARAM = 8
EVAL_FIXED_SECONDS = 0.2
FORWARD_SPEEDUP = 3.0
"""A forward pass without gradients costs about a third of a training step per token (backward ≈ 2× forward)."""


BENCHMARK_ITEMS = {"hellaswag": 10_042, "arc_easy": 2_376, "piqa": 1_838, "winogrande": 1_267, "lambada_openai": 5_153}
"""Items in the split lm_eval scores (HellaSwag, PIQA, WinoGrande: validation; ARC-Easy, LAMBADA: test)."""
BENCHMARK_TOKENS_PER_ITEM = {"hellaswag": 600, "arc_easy": 240, "piqa": 200, "winogrande": 120,
                             "lambada_openai": 160}
"""Tokens forwarded per item: each choice is scored as context + continuation (HellaSwag 4 × ~75 GPT-2 tokens,
ARC-Easy 4 × ~30, PIQA 2 × ~50, WinoGrande 2 × ~30, LAMBADA 1 × ~80), doubled for smaller vocabularies and
batch padding. Estimates, not measured here (the data needs the hub)."""
OTHER_BENCHMARK_ITEMS = 2_000
OTHER_BENCHMARK_TOKENS_PER_ITEM = 400
BENCHMARK_FIXED_SECONDS = 15.0
"""lm_eval's import, the tasks' data and the model loaded (6 s measured for a local 20-item task after a CPU run)."""
TASK_INDEX_SECONDS = 25.0
"""lm_eval's index of its built-in tasks (15–20 s measured on a 2-core CPU machine), built only for their names."""
MAX_BENCHMARK_SHARE = 0.25
"""`oneday run --eval` takes the benchmarks' time out of the training time only up to this share of the
budget; longer benchmarks run after the deadline instead (and the run says so)."""


def benchmark_seconds(tasks: tuple[str, ...], *, limit: int | None, forward_tokens_per_s: float,
                      task_index: bool = True) -> float:
    """lm_eval scoring `tasks` (`limit` items each, all when None) at the no-grad forward speed; `task_index`:
    a built-in task is among them (lm_eval then indexes its task files first)."""
    tokens = 0
    for task in tasks:
        items = BENCHMARK_ITEMS.get(task, OTHER_BENCHMARK_ITEMS)
        items = min(items, limit) if limit is not None else items
        tokens += items * BENCHMARK_TOKENS_PER_ITEM.get(task, OTHER_BENCHMARK_TOKENS_PER_ITEM)
    return BENCHMARK_FIXED_SECONDS + (TASK_INDEX_SECONDS if task_index else 0.0) + tokens / forward_tokens_per_s


def startup_seconds(device: str) -> float:
    """Process start to the first training step, compile excluded."""
    return STARTUP_SECONDS[device]


def checkpoint_bytes(params: int) -> int:
    """The size of one checkpoint: fp32 weights and both AdamW moments."""
    return CHECKPOINT_BYTES_PER_PARAM * params


def model_bytes(params: int) -> int:
    """The size of the final model: fp32 weights (`save_pretrained`, safetensors)."""
    return 4 * params


def checkpoint_write_seconds(params: int) -> float:
    """Writing one checkpoint of a model of `params` parameters: weights and both AdamW moments in fp32, fsynced
    (the final checkpoint, which training does not outlive, costs this)."""
    return CHECKPOINT_FIXED_SECONDS + checkpoint_bytes(params) / DISK_BYTES_PER_S


def checkpoint_snapshot_seconds(params: int) -> float:
    """Copying one checkpoint's state to host memory, the part of a background checkpoint training waits for."""
    return SNAPSHOT_FIXED_SECONDS + checkpoint_bytes(params) / HOST_COPY_BYTES_PER_S


def checkpoint_seconds(params: int, *, every_seconds: float = math.inf) -> float:
    """What one periodic checkpoint takes from training: the snapshot, and the part of the previous background
    write still running when it comes (`every_seconds` apart; the write overlaps the training in between).
    E.g. 1.1B parameters (13.2 GB): 66.5 s written in the foreground, 13.3 s snapshotted every 30 min."""
    return checkpoint_snapshot_seconds(params) + max(0.0, checkpoint_write_seconds(params) - every_seconds)


def final_save_seconds(params: int) -> float:
    """After the loop: the final model and tokenizer, summary, plot, artifact upload and process exit."""
    return FINAL_SAVE_FIXED_SECONDS + FINAL_SAVE_BYTES_PER_PARAM * params / DISK_BYTES_PER_S


def eval_seconds(eval_tokens: int, *, forward_tokens_per_s: float) -> float:
    """One evaluation of `eval_tokens` validation tokens at the measured no-grad forward speed."""
    return eval_tokens / forward_tokens_per_s + EVAL_FIXED_SECONDS


def forward_tokens_per_s(train_tokens_per_s: float) -> float:
    """No-grad forward speed estimated from the training speed, for when it was not measured."""
    return FORWARD_SPEEDUP * train_tokens_per_s


__all__ = [
    "DISK_BYTES_PER_S",
    "MAX_BENCHMARK_SHARE",
    "benchmark_seconds",
    "checkpoint_bytes",
    "checkpoint_seconds",
    "checkpoint_snapshot_seconds",
    "checkpoint_write_seconds",
    "eval_seconds",
    "final_save_seconds",
    "forward_tokens_per_s",
    "model_bytes",
    "startup_seconds",
]
