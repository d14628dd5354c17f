"""Package discovery for oneday's layout, so that no package can be left out of a wheel.

The top-level folders install as sub-packages of `oneday` (`planner/` as `oneday.planner`, ...). Every folder
with an `__init__.py` below each of them is found here, whatever its name: a new sub-package needs no entry
in any list. Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = {
    "oneday": "oneday",
    "oneday.planner": "planner",
    "oneday.runner": "runner",
    "oneday.models": "models",
    "oneday.studies": "studies",
}

packages = []
for package, folder in ROOTS.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=ROOTS)
