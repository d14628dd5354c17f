"""`oneday eval`: score a run's final model on standard benchmarks through lm-evaluation-harness.

`tasks.py` says which tasks (the default set for small models, their chance levels, names and paths the user
gives); `harness.py` runs them (`evaluate_run`) and records the scores in the run folder (`eval.json`) and in
the run's MLflow run. lm_eval is an optional dependency (the `eval` extra), imported only when a run is scored.
"""
