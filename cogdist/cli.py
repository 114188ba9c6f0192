"""`cogdist` command line: render, validate, status, report, models. A thin layer over cogdist.api."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import MISSING, asdict

from cogdist._version import __version__
from cogdist.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING, EXIT_ROWS_FAILED, CogdistError
from cogdist.option import GROUPS, ROW_DEFAULTS
from cogdist.options import declared, flag_of

EPILOG = """exit codes: 0 every row is in the index; 1 some rows failed (recorded under OUT/failures)
or the run stopped; 2 refused before rendering (bad manifest, options or conflicting resume);
130 interrupted."""
# `validate` takes the options that change what a row is and how the model loads.
_VALIDATE_GROUPS = (ROW_DEFAULTS, "trust", "manifest", "adapters")


_TYPES = {"int": int, "float": float}


def add_options(parser: argparse.ArgumentParser, groups: tuple[str | None, ...] | None = None) -> None:
    """Add the declared RenderOptions (those of `groups`; None: all) to `parser`, in their order."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for name, annotation, default, how in declared():
        if groups is not None and how.group not in groups:
            continue
        target: argparse._ActionsContainer = parser
        if how.group is not None:
            if how.group not in sections:
                sections[how.group] = parser.add_argument_group(GROUPS[how.group])
            target = sections[how.group]
        flag = flag_of(name, how)
        kind = annotation.split(" | ")[0]
        kwargs: dict = {"help": how.help}
        if kind.startswith("tuple["):  # repeatable: --lora A --lora B
            kwargs["action"] = "append"
            if how.metavar is not None:
                kwargs["metavar"] = how.metavar
            default = None  # argparse appends to a copy of its default, which a tuple cannot take (None: ())
        elif kind == "bool":
            if annotation == "bool | None":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_false" if default else "store_true"
        else:
            if kind in _TYPES:
                kwargs["type"] = _TYPES[kind]
            if how.choices is not None:
                kwargs["choices"] = how.choices
            if how.metavar is not None:
                kwargs["metavar"] = how.metavar
        if not flag:
            target.add_argument(name, **kwargs)
            continue
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        target.add_argument(flag, dest=name, **kwargs)
        for alias, value in (how.aliases or {}).items():
            target.add_argument(
                alias,
                dest=name,
                action="store_const",
                const=value,
                default=argparse.SUPPRESS,
                help=f"the same as {flag} {value}",
            )


def option_values(args: argparse.Namespace, groups: tuple[str | None, ...] | None = None) -> dict:
    """The parsed values of the options `add_options` added."""
    return {
        name: getattr(args, name) for name, _, _, how in declared() if groups is None or how.group in groups
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogdist",
        description="Render batches of CogView4 / CogVideoX / GLM-Image outputs across GPUs with Ray.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"cogdist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser(
        "render", help="render a manifest (re-run the same command to resume)", epilog=EPILOG
    )
    add_options(render)

    validate = commands.add_parser("validate", help="check a manifest against a model without rendering")
    validate.add_argument("manifest")
    validate.add_argument("--model", required=True)
    add_options(validate, _VALIDATE_GROUPS)

    status = commands.add_parser("status", help="done / failed (and pending, given the manifest) of an OUT")
    status.add_argument("out")
    status.add_argument("--manifest", help="count pending rows of this manifest too")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 0 only when the job is complete: 3 when manifest rows are pending, 1 when rows failed",
    )

    report = commands.add_parser(
        "report", help="an HTML page and a PNG of a job: throughput, replicas, failures, samples"
    )
    report.add_argument("out", help="the job's OUT (local path or s3:// / gs:// URI)")
    report.add_argument("--html", help="where to write the page (default OUT/report.html)")
    report.add_argument("--png", help="where to write the PNG (default OUT/report.png)")
    report.add_argument(
        "--thumbnails",
        "--samples",  # its spelling before `render --samples`
        dest="thumbnails",
        type=int,
        default=24,
        help="outputs shown on the contact sheet (default 24; --samples is the older spelling)",
    )

    models = commands.add_parser("models", help="list the model presets, or save a tiny one as a folder")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.add_argument(
        "--save",
        nargs=2,
        metavar=("PRESET", "DIR"),
        help="write a tiny preset's pipeline to DIR with save_pretrained (a diffusers folder: "
        "--model DIR, stock diffusers, LoRA training)",
    )
    return parser


def _render(args: argparse.Namespace) -> int:
    from cogdist.api import render

    values = option_values(args)
    summary = render(values.pop("manifest"), model=values.pop("model"), out=values.pop("out"), **values)
    print(summary.describe())
    return summary.exit_code


def _validate(args: argparse.Namespace) -> int:
    from cogdist.api import validate

    report = validate(args.manifest, model=args.model, **option_values(args, _VALIDATE_GROUPS))
    print(f"ok: {report.rows} rows in {report.files} file(s) can be rendered with {args.model}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from cogdist.api import status

    result = status(args.out, args.manifest)
    code = _status_exit_code(result) if args.check else EXIT_OK
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return code
    print(f"{result.out}: model {result.model}")
    print(f"  done     {result.done}")
    print(f"  failed   {result.failed}")
    if result.pending is not None:
        print(f"  pending  {result.pending}")
    for item_id, error, attempts in result.failures:
        print(f"  failed {item_id!r} after {attempts} attempt(s): {error.splitlines()[0][:200]}")
    return code


def _status_exit_code(result) -> int:
    # Pending before failed: the next step is then to resume the render, which finishes the
    # rest; failed rows are the question once nothing is pending. No --manifest: pending unknown.
    if result.pending:
        return EXIT_PENDING
    if result.failed:
        return EXIT_ROWS_FAILED
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from cogdist.api import report

    files = report(args.out, html=args.html, png=args.png, thumbnails=args.thumbnails)
    print(f"report of {files.done} done and {files.failed} failed rows")
    if files.done == 0:
        print("  no row has finished yet: the report shows the failures alone")
    print(f"  page  {files.html}")
    print(f"  png   {files.png}")
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from cogdist.api import models, save_model
    from cogdist.worker.offload import weight_memory

    if args.save:
        preset, folder = args.save
        print(f"saved {preset} to {save_model(preset, folder)}")
        return EXIT_OK

    specs = models()
    if args.json:
        print(json.dumps([{**asdict(s), "conditioning": sorted(s.conditioning)} for s in specs], indent=2))
        return EXIT_OK
    print(f"{'MODEL':<40} {'TASKS':<34} {'DEFAULT':<28} SIZES")
    for s in specs:
        default = f"{s.width}x{s.height} {s.num_inference_steps} steps"
        if s.kind == "video":
            default += f" {s.num_frames}f@{s.fps:g}fps"
        print(f"{s.name:<40} {', '.join(s.tasks):<34} {default:<28} {s.sizes.describe()}")
        notes = [s.description]
        if s.frames:
            notes.append(f"frames: {s.frames.describe()}")
        memory = []
        for name, _, _, how in declared():
            value = getattr(s, how.spec_field or name) if how.group == "memory" else None
            if value is True:
                memory.append(name.replace("_", " "))
            elif value and value != "none":  # --offload
                memory.append(f"{name} {value}")
        if memory:
            notes.append(f"default memory options: {', '.join(memory)}")
        if s.weights:
            notes.append(weight_memory(s.weights))
        print(f"    {'; '.join(notes)}")
    print(
        "\nAlso accepted: any Hugging Face repo id of these pipelines, or a local folder with model_index.json."
    )
    return EXIT_OK


def _terminate(signum: int, frame: object) -> None:
    # `ray job stop` and Kubernetes send SIGTERM: unwind so that finished rows are committed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _terminate)
    handlers = {
        "render": _render,
        "validate": _validate,
        "status": _status,
        "report": _report,
        "models": _models,
    }
    try:
        return handlers[args.command](args)
    except CogdistError as e:
        print(f"cogdist: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "cogdist: interrupted; finished rows are committed, re-run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
