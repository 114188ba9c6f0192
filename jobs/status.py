"""Ray job entry point: is a render complete? A gate for job pipelines.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/status.py OUT --manifest MANIFEST

Takes the arguments of `cogdist status`; OUT and --manifest may instead come from COGDIST_OUT
and COGDIST_MANIFEST. Prints the status (done, failed, pending, the first failures) and exits
as `cogdist status --check` does, so that Ray marks the job SUCCEEDED only when the render is
complete, and the exit code (in `ray job status`) says what to do next:

    0  complete: every manifest row is in the index (without a manifest: no failed rows)
    3  rows are pending (the render was stopped or is still running): submit the render again
    1  nothing is pending but rows failed: `--retry-failed`, or accept them
    2  refused: OUT holds no cogdist job, or the arguments are wrong
       (storage errors: 1, with the error in the log)

Without a manifest, pending rows cannot be counted: give it for a completeness check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds cogdist/

from jobs._common import MANIFEST, OUT, run, with_environment  # noqa: E402


def arguments(argv: list[str], env: dict[str, str]) -> list[str]:
    """`cogdist status --check` arguments from the job's command line and environment."""
    args = with_environment("status", argv, env, positional=OUT, options={"--manifest": MANIFEST})
    return [*args, "--check"]


if __name__ == "__main__":
    raise SystemExit(run(arguments(sys.argv[1:], dict(os.environ))))
