"""oneday.studies: tuning on μP proxies, the transfer to the planned model, and loss-law calibration
(docs/design.md, Tuning and Calibration).

- `tune`: the entry points (`tune_plan`, `run_worker`, `prepare_study`);
- `study`: a study's settings (proxy, trial count, search space), decided once and stored in it; sampler, pruner;
- `space`: what is searched (the LR, and the schedule when it transfers);
- `storage`: where a study lives (journal file or RDB) and which trials belong to dead processes;
- `trials`: the objective: one short run per trial, reported to the pruner and to MLflow;
- `proxy`: μP proxies of the planned model and their sizing; `short_run`: one complete short run;
- `pruning`: successive halving with a tolerance;
- `transfer`: from the proxy's optimum to the plan (μP width, token horizon), the transfer check, the tuned plan;
- `results`: what a study reports;
- `calibrate`: `oneday tune --calibrate`, E, A, B fitted to the user's data.

Nothing here is imported by `oneday.cli` at start-up; the `tune` command imports what it runs.
"""
