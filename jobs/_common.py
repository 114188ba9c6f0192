"""What the Ray job entry points share: settings from the environment, and the lines a user
greps for in `ray job logs`.

A RayJob spec or a `ray job submit --runtime-env-json '{"env_vars": ...}'` sets the same
variables for every step of a pipeline (COGDIST_MANIFEST, COGDIST_MODEL, COGDIST_OUT); the
command line wins where it gives a value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cogdist
from cogdist.cli import main

MANIFEST = "COGDIST_MANIFEST"
MODEL = "COGDIST_MODEL"
OUT = "COGDIST_OUT"


def with_environment(
    command: str,
    argv: list[str],
    env: dict[str, str],
    *,
    positional: str,
    options: dict[str, str],
) -> list[str]:
    """`cogdist COMMAND` arguments: `argv`, completed from `env`.

    The positional argument comes from env[positional] when `argv` does not start with one (it
    is empty or starts with an option); each `--option` of `options` (option -> variable) is
    appended from the environment when `argv` does not give it.
    """
    args = list(argv)
    if (not args or args[0].startswith("-")) and env.get(positional):
        args.insert(0, env[positional])
    for option, variable in options.items():
        given = any(arg == option or arg.startswith(f"{option}=") for arg in args)
        if not given and env.get(variable):
            args += [option, env[variable]]
    return [command, *args]


def run(args: list[str]) -> int:
    """Run `cogdist ARGS` as a job: say which code runs, and end with one line saying how it went.

    Ray marks a job FAILED when its entry point exits non-zero; the last line of `ray job logs`
    says why (`cogdist job render: failed (exit 1)`), the CLI's own summary is just above it.
    """
    command = args[0]
    # The job runs the cogdist that `--working-dir` uploaded, not one installed on the node:
    # this line shows which (the upload lands under Ray's runtime_resources/working_dir_files/).
    print(f"cogdist job {command}: cogdist {cogdist.__version__} from {Path(cogdist.__file__).parent}")
    sys.stdout.flush()  # before the CLI's progress on stderr, which is not buffered
    code = main(args)
    sys.stderr.flush()
    outcome = "succeeded" if code == 0 else "failed"
    print(f"cogdist job {command}: {outcome} (exit {code})", flush=True)
    return code
