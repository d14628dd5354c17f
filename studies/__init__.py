"""oneday.studies: tuning on μP proxies, the transfer to the planned model, and loss-law calibration (DESIGN §5–6).

- `proxy`: proxies of the planned model, their sizing from measured step times, one short run (a trial).
- `tune`: the Optuna study (`tune_plan`, `run_worker`, `prepare_study`), its storage and budget.
- `pruning`: successive halving with a tolerance.
- `transfer`: the transfer check and the tuned plan with its provenance.
- `tracking`: MLflow parent/child runs and the study's plots.
- `calibrate`: `oneday tune --calibrate`, E, A, B fitted to the user's data.

Nothing here is imported by `oneday.cli` at start-up; the `tune` command imports what it runs.
"""
