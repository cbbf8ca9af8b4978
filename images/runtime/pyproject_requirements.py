"""Print the requirements of the humpback distribution and some of its extras, from pyproject.toml.

    python images/runtime/pyproject_requirements.py pyproject.toml train s3 hub > requirements.txt

The runtime image (images/runtime/Dockerfile) installs the dependencies in a layer of their own,
from pyproject.toml alone, before the sources arrive: a source change then rebuilds only the last,
small layer. Standard library only (tomllib), since it runs on the bare base image.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    """The project's dependencies plus those of `extras`, in order, without duplicates."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no extra(s) {', '.join(unknown)}; known: {', '.join(sorted(optional))}")
    out: list[str] = []
    for req in [*project.get("dependencies", []), *(r for e in extras for r in optional[e])]:
        if req not in out:
            out.append(req)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0], argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
