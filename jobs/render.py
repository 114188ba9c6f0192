"""Entry point for Ray job submission: render a manifest on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/render.py MANIFEST --model MODEL --out OUT [...]

Takes the arguments of `cogdist render`; MANIFEST, --model and --out may instead come from
COGDIST_MANIFEST, COGDIST_MODEL and COGDIST_OUT (handy in a RayJob spec). The job joins the
cluster through $RAY_ADDRESS, which Ray sets for submitted jobs, prints a final summary and
exits non-zero when rows failed, so the job is marked failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds cogdist/

from cogdist.cli import main  # noqa: E402


def arguments(argv: list[str], env: dict[str, str]) -> list[str]:
    args = list(argv)
    if (not args or args[0].startswith("-")) and env.get("COGDIST_MANIFEST"):
        args.insert(0, env["COGDIST_MANIFEST"])
    for flag, name in (("--model", "COGDIST_MODEL"), ("--out", "COGDIST_OUT")):
        if flag not in args and env.get(name):
            args += [flag, env[name]]
    return ["render", *args]


if __name__ == "__main__":
    raise SystemExit(main(arguments(sys.argv[1:], dict(os.environ))))
