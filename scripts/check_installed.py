"""Exit 1, naming what is wrong, if an installed package does not meet raypref's requirements
(its dependencies and its test extra).

setup.sh installs the dependencies from requirements.lock and the project itself without them;
a dependency added to pyproject.toml but not yet locked would go unnoticed until an import
failed. This names it and the fix instead.
"""
import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

problems = []
for text in requires("raypref") or []:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
        continue  # another extra (e.g. llm) or another platform
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        problems.append(f"{requirement} is not installed")
        continue
    if not requirement.specifier.contains(installed, prereleases=True):
        problems.append(f"{requirement} is required, {installed} is installed")
if problems:
    sys.exit("setup: the lock does not match pyproject.toml: " + "; ".join(problems)
             + ". Run `bash scripts/lock.sh` and commit the lock files.")
