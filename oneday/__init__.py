"""oneday: the best language model you can train on this machine in the time you have."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oneday")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
