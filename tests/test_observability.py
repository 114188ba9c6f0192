"""Seeing a run: the progress line's counts and replica states, and the job's Ray metrics."""

from __future__ import annotations

import re
import time
import urllib.request

from cogdist import engine
from cogdist.options import RenderOptions
from cogdist.progress import Progress
from tests.conftest import write_manifest
from tests.faults import poison_when_all_render


def test_progress_line_lists_replicas_or_counts_them_by_state():
    progress = Progress(total=10, enabled=False, replicas=3)
    progress.set_replicas(["busy", "starting", "lost"])
    progress.advance(done=4, failed=1)
    assert progress.describe() == "done=4 failed=1 pending=5 | replicas 0:busy 1:starting 2:lost"
    many = Progress(total=2, enabled=False, replicas=12)
    many.set_replicas(["busy"] * 9 + ["idle", "restarting", "restarting"])
    assert many.describe().endswith("| replicas 9 busy, 1 idle, 2 restarting")
    # A fleet: replicas waiting for the cluster to place them, one draining, and the nodes in use.
    fleet = Progress(total=4, enabled=False, replicas=3)
    fleet.set_replicas(["busy", "draining", "waiting"], nodes=2)
    assert fleet.describe() == "done=0 failed=0 pending=4 | replicas 0:busy 1:draining 2:waiting | nodes 2"


def scrape(port: int) -> dict[tuple[str, str], float]:
    """cogdist's samples on a node's Prometheus endpoint: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"(ray_cogdist_\w+)\{(.*)\} (\S+)$", line)
        if match:
            samples[(match.group(1), match.group(2))] = float(match.group(3))
    return samples


def metric(samples: dict, name: str, out: str, **labels: str) -> float:
    """The sum of `name`'s samples tagged with this job's OUT (and `labels`)."""
    wanted = [f'out="{out}"', *(f'{k}="{v}"' for k, v in labels.items())]
    return sum(v for (n, tags), v in samples.items() if n == name and all(w in tags for w in wanted))


def test_a_run_shows_its_counts_replicas_and_ray_metrics(ray_session, tmp_path, capsys):
    rows = [{"id": f"m{i}", "prompt": "poison" if i == 2 else f"metrics {i}"} for i in range(5)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    options = RenderOptions(
        str(manifest), "tiny-cogview4", str(out), steps=3, max_retries=0, replicas=2, progress=True
    )
    # Both replicas hold a unit before any row finishes, so the line shows both rendering.
    summary = engine.run(options, worker_class=poison_when_all_render(tmp_path, replicas=2))
    assert (summary.done, summary.failed) == (4, 1)

    log = capsys.readouterr().err
    assert "done=4 failed=1 pending=0 | replicas 0:" in log, log[-2000:]
    assert re.search(r"replicas 0:(busy|idle) 1:(busy|idle)", log), "both replicas shown rendering"

    port = ray_session.nodes()[0]["MetricsExportPort"]
    expected = {
        "ray_cogdist_items_done_total": 4,
        "ray_cogdist_items_failed_total": 1,
        "ray_cogdist_item_seconds_count": 4,
        # Three steps per row, one row per call: two intervals between steps each.
        "ray_cogdist_step_seconds_count": 8,
        "ray_cogdist_queue_depth": 0,
    }
    deadline = time.monotonic() + 60  # the metrics agent exports every few seconds
    while True:
        samples = scrape(port)
        seen = {name: metric(samples, name, str(out), model="tiny-cogview4") for name in expected}
        if seen == expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert seen == expected
    assert metric(samples, "ray_cogdist_item_seconds_sum", str(out)) > 0
    assert metric(samples, "ray_cogdist_step_seconds_bucket", str(out), le="+Inf") == 8
