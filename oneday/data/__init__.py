"""oneday.data: a corpus in, cached token files and training windows out.

- `sources`: what `--data` names (files, folders, globs, `builtin:pydoc`, hub datasets) and how its text is read
  into documents;
- `prepare`: `prepare_data`, the tokenizer and the content-keyed cache entry of token files (`PreparedData`);
- `windows`: the seeded window sampler that training reads through one integer cursor, and the fixed
  validation windows.

Used by the planner (to size a plan for the data), the runner and the tuner (to train on it) and the benches.
"""
