"""oneday.tracking: everything oneday writes to MLflow and draws, in one place.

- `names`: experiment, run, tag, param and metric names shared by run, tune, calibration and compare;
- `store`: which tracking store (flag, environment, local sqlite), whether it answers, the experiment;
- `writer`: `MlflowTracker`, the background thread that logs one run without slowing training;
- `recorder`: `RunRecorder`, the training loop's observer that writes metrics.jsonl and feeds the writer;
- `system`: system metrics (GPU through NVML, process memory and CPU);
- `study`: the tuner's parent and child runs;
- `plots`: the loss curve, the tuning plots and the comparison plot (matplotlib's Agg canvas, no display).

mlflow and matplotlib are imported only where they are used, never at import time.
"""
