"""Print the requirements of normserve's dependency groups, one per line, for an image build.

    python3 docker/deps.py cpu           # the CPU server: the serving dependencies and onnxruntime's CPU build
    python3 docker/deps.py gpu           # the GPU server: onnxruntime-gpu with CUDA 13 and cuDNN 9 from pip
    python3 docker/deps.py cpu train     # the models stage: what the exporter needs besides
    python3 docker/deps.py native        # the compiled stage: Cython, and the serving modules it compiles

The names and versions come from pyproject.toml, read with the standard library only (an image has
nothing else yet); pip's ``--constraint requirements.lock`` pins everything beneath them. The gpu
group asks for onnxruntime-gpu's ``cuda`` and ``cudnn`` extras, which bring the CUDA libraries as
wheels: the host's driver supplies only ``libcuda.so.1``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

__all__ = ["requirements", "main"]

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CUDA_EXTRAS = "[cuda,cudnn]"


def requirements(groups: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The serving dependencies, then those of each optional group, without comments or duplicates."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    unknown = [g for g in groups if g not in extras]
    if unknown:
        raise ValueError(f"unknown dependency group(s) {unknown}; pyproject.toml has {sorted(extras)}")
    wanted = list(project["dependencies"])
    for group in groups:
        for requirement in extras[group]:
            if group == "gpu":  # the CUDA and cuDNN wheels too, for an image with no CUDA of its own
                requirement = re.sub(r"^onnxruntime-gpu(?=[=<>~!])", f"onnxruntime-gpu{CUDA_EXTRAS}", requirement)
            wanted.append(requirement)
    return list(dict.fromkeys(wanted))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print("\n".join(requirements(argv)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
