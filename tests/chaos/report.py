"""Run the chaos scenarios and write docs/reliability.md (and benchmarks/results/reliability.json).

    python -m tests.chaos.report                       # every scenario
    python -m tests.chaos.report --only driver-kills-s3  # one; the others keep their last figures
    python -m tests.chaos.report --steps 6 --json benchmarks/results/reliability_steps6.json \
        --out /tmp/fast.md --label "--steps 6 (renders ~4x quicker)"
                                                       # do the faults still land?

Each scenario runs in a fresh temporary folder. With --only, the results of the scenarios not
run are taken from the existing JSON, so the document always lists every scenario. Results
kept beside the main ones as benchmarks/results/reliability_*.json (runs under other
conditions, each with its --label) appear in the document's table of conditions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine
from tests.chaos.harness import ROOT, STEPS, Outcome
from tests.chaos.scenarios import SCENARIOS

DOC = ROOT / "docs" / "reliability.md"
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (
        " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    )


def run_one(name: str, steps: int | None = None) -> Outcome:
    """Run one scenario; `steps` (where the scenario takes it) changes how long its renders take."""
    started = time.monotonic()
    scenario = SCENARIOS[name]
    takes_steps = "steps" in inspect.signature(scenario).parameters
    with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as workdir:
        try:
            return scenario(Path(workdir), **({"steps": steps} if steps and takes_steps else {}))
        except Exception as e:  # a scenario that crashes is a failed row, not a crashed report
            traceback.print_exc()
            return Outcome(
                scenario=name,
                injected="(the scenario raised)",
                times=0,
                expected=0,
                indexed=0,
                duplicates=0,
                lost=0,
                failed=0,
                problems=[f"the scenario raised {type(e).__name__}: {e}"],
                seconds=round(time.monotonic() - started, 1),
            )


def load(path: Path) -> dict[str, dict]:
    """Earlier results by scenario name (each with its own date, commit and machine)."""
    if not path.exists():
        return {}
    return {entry["scenario"]: entry for entry in json.loads(path.read_text()).get("scenarios", [])}


def conditions(main: Path) -> list[tuple[str, dict[str, dict]]]:
    """The runs kept under other conditions beside `main` (reliability_*.json), by label."""
    runs = []
    for path in sorted(main.parent.glob(f"{main.stem}_*.json")):
        data = json.loads(path.read_text())
        runs.append((data.get("label", path.stem), load(path)))
    return runs


def render_conditions(entries: list[dict], others: list[tuple[str, dict[str, dict]]]) -> list[str]:
    """A table: each scenario's result in the main run and under each other condition."""
    if not others:
        return []
    runs = [
        (f"--steps {entries[0].get('steps', STEPS)} (this document)", {e["scenario"]: e for e in entries})
    ]
    runs += others
    lines = [
        "## Faster and slower machines",
        "",
        "The progress-keyed faults must land, and the audit pass, however fast the renders run. The",
        "same scenarios with renders sped up and slowed down (each cell: result, faults that landed,",
        "seconds; the rows indexed at each fault are in that run's JSON notes):",
        "",
        "| scenario | " + " | ".join(label for label, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for name in [e["scenario"] for e in entries]:
        cells = []
        for _, run in runs:
            if name not in run:
                cells.append("—")
                continue
            o = Outcome.from_dict(run[name])
            cells.append(f"{'pass' if o.ok else '**FAIL**'}, {o.times} landed, {o.seconds:.0f} s")
        if any(cell != "—" for cell in cells[1:]):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_doc(entries: list[dict], others: list[tuple[str, dict[str, dict]]] | None = None) -> str:
    lines = [
        "# Reliability: fault injection against real runs",
        "",
        "Each scenario injects faults into real renders of a tiny model (`python -m cogdist render`",
        "subprocesses; the out-of-memory one through the Python API with a fault-injecting worker),",
        "lets the same command finish, and audits OUT as a user of the dataset sees it: every",
        "manifest id indexed exactly once, every output present, decodable and matching its index row",
        "(size, frame count, and `bytes`/`sha256` where the index has them), no output without an index",
        "row (orphans), no temporary files, no process of a killed driver left running. The harness is",
        "`tests/chaos/` (`harness.py`: the audit, the driver killer, a moto S3 server; `outage.py`: a",
        "store that goes away and restarts; `workers.py`: worker, input, memory and checkpoint faults;",
        "`fleet.py`: a multi-node Ray cluster on one machine whose nodes are SIGKILLed and replaced;",
        "`scenarios.py`: the registry; `progress.py`: what a fault waits for). Every fault strikes at a",
        "point of the job's *progress* seen from outside — before the driver prints, once it has printed",
        "(job record written), while its workers start, after N rows of an attempt with a unit in flight",
        "and its outputs not yet indexed, just after a commit, once the store has reported a retry —",
        "never at a time on the clock, and each scenario holds enough rows for every planned fault to",
        "land on a machine up to 4x faster than this one (and on any slower one); a fault that could not",
        "land (the job had finished) is not counted. `--steps N` renders slower or faster to check it.",
        "Re-run it all, or one scenario, with:",
        "",
        "```bash",
        "python -m tests.chaos.report                      # every scenario (a few minutes each on 2 cores)",
        "python -m tests.chaos.report --only driver-kills-s3",
        "python -m pytest -q tests/chaos                   # shorter versions of them, as tests",
        "```",
        "",
        "What a user can expect from these figures: a driver killed at any point, any number of times,",
        "costs at most the rows rendered since the last commit (rendered again, never indexed twice);",
        "a worker or node lost costs its gang's units in flight, which go back to the queue — charged",
        "to nobody when the node went away (`spot-week`: nodes SIGKILLed and fresh ones joined through",
        "one run, the job growing onto them by itself), and never adding up over a long run",
        "(`preemptions`: one replica preempted 10 times, exit 0 with the default `--max-gang-restarts`",
        "3, which counts failures in a row). CI runs shorter versions that still kill: the driver 5",
        "times per store, one of each kind (`tests/chaos/test_driver_kills.py`), one replica preempted 10",
        "times (`test_preemption.py`), a node kill between two joins (`tests/test_fleet_growth.py`).",
        "",
        "The figures below come from the last run of each scenario "
        "(raw: `benchmarks/results/reliability.json`).",
        "",
        "| scenario | injected | times | rows expected | rows indexed | duplicates | lost "
        "| failed rows recorded | result | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for e in entries:
        o = Outcome.from_dict(e)
        lines.append(
            f"| {o.scenario} | {o.injected} | {o.times} | {o.expected} | {o.indexed} | {o.duplicates} "
            f"| {o.lost} | {o.failed} | {'pass' if o.ok else '**FAIL**'} | {o.seconds:.0f} |"
        )
    lines += ["", *render_conditions(entries, others or []), "## Per scenario", ""]
    for e in entries:
        o = Outcome.from_dict(e)
        m = e.get("machine", {})
        lines += [
            f"### {o.scenario}",
            "",
            f"Run {e.get('date', '?')} at commit {e.get('commit', '?')} on {m.get('cpu', '?')}, "
            f"{m.get('cores', '?')} cores.",
            "",
        ]
        if o.notes:
            lines += [f"Notes: {o.notes}", ""]
        lines += [f"- problem: {p}" for p in o.problems] or ["No problems found."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--out", type=Path, default=DOC, help="the Markdown report (default docs/reliability.md)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="the raw results")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"denoising steps of the scenarios' renders (default {STEPS}): fewer make a quicker "
        "machine, more a slower one; the faults must land either way",
    )
    parser.add_argument(
        "--label",
        help="what was different about this run, for the table of conditions (default: --steps N)",
    )
    args = parser.parse_args(argv)

    names = args.only or list(SCENARIOS)
    entries = load(args.json)
    context = {"machine": machine(), "commit": git_commit()}
    for name in names:
        print(f"{name}: running", flush=True)
        outcome = run_one(name, args.steps)
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries[name] = {**outcome.to_dict(), "date": date, "steps": args.steps or STEPS, **context}
        print(outcome.describe(), flush=True)

    ordered = [entries[n] for n in SCENARIOS if n in entries] + [
        e for n, e in entries.items() if n not in SCENARIOS
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    label = args.label or (f"--steps {args.steps}" if args.steps else None)
    record = {**({"label": label} if label else {}), "scenarios": ordered}
    args.json.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    others = conditions(RESULTS) if args.json == RESULTS else []
    args.out.write_text(render_doc(ordered, others))
    print(f"wrote {args.out} and {args.json}")
    return 0 if all(Outcome.from_dict(entries[n]).ok for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
