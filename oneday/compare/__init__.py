"""oneday.compare: read runs back from MLflow and put them side by side (`oneday compare`, `oneday ui`).

- `readers`: three readers of a store (sqlite read directly, the MLflow client, a server's REST API);
- `runs`: which runs to compare, their rows, sorting, and `compare_runs`;
- `ui`: the MLflow UI's links, free ports, and the lean `mlflow server` that `oneday ui` starts and stops.
"""
