#!/usr/bin/env python3
"""Print a resnet-serve distribution's runtime requirements, one per line, without paddlepaddle, without the
workspace's own distributions (installed from the build context) and without extras.

The GPU image starts from a Paddle GPU base that already has `paddlepaddle-gpu`; installing the project's
`paddlepaddle` (the CPU wheel, a different distribution of the same `paddle` module) on top would clobber it. So
the image installs the project with --no-deps and then exactly these. Reads the installed distribution's metadata,
so the list is server/pyproject.toml's, never a second copy.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

PROVIDED_BY_BASE = {"paddlepaddle", "paddlepaddle-gpu"}


def runtime_requirements(dist: str = "resnet-serve-server") -> list[str]:
    out = []
    for req in requires(dist) or []:
        if "extra ==" in req.replace('"', "").replace("'", ""):
            continue
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name not in PROVIDED_BY_BASE and not name.startswith("resnet-serve"):
            out.append(req)
    return out


if __name__ == "__main__":
    print("\n".join(runtime_requirements(*sys.argv[1:])))
