"""Write the requirement files of `make wheelhouse`: dcesynth's runtime dependencies minus torch.

A GPU server brings its own torch (and torch's own dependencies) and must not be handed a
second, differently built copy, so nothing is downloaded on torch's behalf. Walking the
installed ``dcesynth``'s dependency tree (run this with the project's venv), it writes to
``OUT``:

- ``no-deps.txt``: the distributions that themselves require torch (MONAI), pinned to the
  tested version, to download without their dependencies;
- ``requirements.txt``: every other requirement of dcesynth and of those distributions,
  for pip to resolve for the target Python;
- ``constraints.txt``: the versions installed here (the tested set), when the target Python
  is this one; empty otherwise, as they may have no wheels for another Python.

Environment markers are evaluated here, for the target Python, and left out of the files.

Usage: ``python scripts/wheelhouse_requirements.py OUT [--python-version 3.10]``
"""

from __future__ import annotations

import argparse
import platform
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "dcesynth"
EXCLUDED = "torch"


def applicable(name: str, environment: dict[str, str]) -> list[Requirement]:
    """The requirements of installed distribution `name` that apply in `environment`."""
    requirements = [Requirement(text) for text in metadata.requires(name) or []]
    return [r for r in requirements if not r.marker or r.marker.evaluate(environment)]


def write_requirements(out: Path, python_version: str) -> None:
    """Write no-deps.txt, requirements.txt and constraints.txt to `out`."""
    environment = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "extra": "",
    }
    no_deps, resolved, installed = set(), set(), {}
    pending, seen = [ROOT], {ROOT}
    while pending:
        name = pending.pop()
        for requirement in applicable(name, environment):
            key = canonicalize_name(requirement.name)
            if key == EXCLUDED or key in seen:
                continue
            seen.add(key)
            try:
                installed[key] = metadata.version(key)
            except metadata.PackageNotFoundError:
                continue  # needed only by another Python: pip resolves it from the spec
            pending.append(key)
            if any(canonicalize_name(r.name) == EXCLUDED for r in applicable(key, environment)):
                no_deps.add(f"{key}=={installed[key]}")
    for name in [ROOT, *(pin.split("==")[0] for pin in no_deps)]:
        for requirement in applicable(name, environment):
            key = canonicalize_name(requirement.name)
            if key != EXCLUDED and f"{key}=={installed.get(key)}" not in no_deps:
                extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
                resolved.add(f"{key}{extras}{requirement.specifier}")
    same_python = python_version == ".".join(platform.python_version_tuple()[:2])
    constraints = [f"{key}=={version}" for key, version in installed.items()] if same_python else []
    out.mkdir(parents=True, exist_ok=True)
    for filename, lines in (
        ("no-deps.txt", no_deps),
        ("requirements.txt", resolved),
        ("constraints.txt", constraints),
    ):
        (out / filename).write_text("".join(f"{line}\n" for line in sorted(lines)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the three files")
    parser.add_argument(
        "--python-version",
        default=".".join(platform.python_version_tuple()[:2]),
        help="Python the wheels are for, e.g. 3.10 (default: this one)",
    )
    args = parser.parse_args()
    write_requirements(args.out, args.python_version)


if __name__ == "__main__":
    main()
