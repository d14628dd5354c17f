"""`python -m oneday ...`: the same command line as `oneday ...`, e.g. `torchrun --nproc-per-node 8 -m oneday run
plan.json` without looking up where the `oneday` script was installed."""

from oneday.cli import main

if __name__ == "__main__":
    main()
