"""Ray job entry point: check a manifest against a model without rendering anything.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/validate.py MANIFEST --model MODEL [--width W --height H --steps N ...]

Takes the arguments of `cogdist validate`; MANIFEST and --model may instead come from
COGDIST_MANIFEST and COGDIST_MODEL. Runs the checks a render makes before it starts (every row,
every file of the manifest, read where the cluster reads it), so a pipeline can refuse a bad
manifest before it reserves GPUs. Its log ends with

    ok: 1000 rows in 4 file(s) can be rendered with THUDM/CogView4-6B
    cogdist job validate: succeeded (exit 0)

or with the problems found and `cogdist job validate: failed (exit 2)`.

Exit codes: 0 the manifest can be rendered; 2 refused (the problems are in the log: bad rows,
unknown model, bad options); 1 the manifest or model could not be read (storage error).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds cogdist/

from jobs._common import MANIFEST, MODEL, run, with_environment  # noqa: E402


def arguments(argv: list[str], env: dict[str, str]) -> list[str]:
    """`cogdist validate` arguments from the job's command line and environment."""
    return with_environment("validate", argv, env, positional=MANIFEST, options={"--model": MODEL})


if __name__ == "__main__":
    raise SystemExit(run(arguments(sys.argv[1:], dict(os.environ))))
