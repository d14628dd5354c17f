"""oneday.data: a corpus in, cached token files and training windows out.

- `sources`: what `--data` names (files, folders, globs, `builtin:pydoc`, hub datasets);
- `documents`: reading a source as documents (plain text cut at paragraphs, one row of structured data, one
  hub row), and what to do with text that is not UTF-8;
- `tokenizer`: a byte-level BPE trained on the corpus, or an existing tokenizer, and the batch encoder;
- `prepare`: `prepare_data`, the content-keyed cache entry of token files (`PreparedData`);
- `shards`: the token files as shards with a manifest, encoded by a pool of processes, resumable, and read back
  as one flat array (`ShardedTokens`);
- `plan_data`: the data a plan names, checked by its key, prepared again when missing;
- `windows`: the seeded window sampler that training reads through one integer cursor, and the fixed
  validation windows.

Used by the planner (to size a plan for the data), the runner and the tuner (to train on it) and the benches.
"""
