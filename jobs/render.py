"""Ray job entry point: render a manifest on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/render.py MANIFEST --model MODEL --out OUT [...]

Takes the arguments of `cogdist render`; MANIFEST, --model and --out may instead come from
COGDIST_MANIFEST, COGDIST_MODEL and COGDIST_OUT (handy in a RayJob spec). The job joins the
cluster through $RAY_ADDRESS, which Ray sets for submitted jobs, and runs the cogdist that
--working-dir uploaded. Submitting the same job again resumes it.

Its log (`ray job logs ID`) ends with the render's summary and the job's outcome:

    3 rendered, 0 already done, 0 failed of 3 rows in 14.6s (0.21 items/s) -> s3://bucket/run
    cogdist job render: succeeded (exit 0)

Exit codes, those of `cogdist render` (Ray marks the job FAILED on any but 0): 0 every row is in
the index; 1 some rows failed (recorded under OUT/failures) or the run stopped; 2 refused before
rendering (bad manifest, options or conflicting resume); 130 stopped (`ray job stop`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds cogdist/

from jobs._common import MANIFEST, MODEL, OUT, run, with_environment  # noqa: E402


def arguments(argv: list[str], env: dict[str, str]) -> list[str]:
    """`cogdist render` arguments from the job's command line and environment."""
    return with_environment(
        "render", argv, env, positional=MANIFEST, options={"--model": MODEL, "--out": OUT}
    )


if __name__ == "__main__":
    raise SystemExit(run(arguments(sys.argv[1:], dict(os.environ))))
