"""A fleet that grows and loses nodes under one job, each test on a cluster of its own (so they
need not share the `fleet` module's): nodes SIGKILLed and joined mid-run (the CI-sized
`spot-week` chaos scenario), and an autoscaling cluster asked for the job's gangs."""

from __future__ import annotations

import pytest

from tests.chaos.fleet import spot_week
from tests.test_fleet import Job, index

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_nodes_killed_and_joined_mid_run_lose_and_duplicate_nothing(tmp_path):
    """A node joins (the job grows onto it and renders there), one is SIGKILLed (raylet and
    workers) mid-run and a fresh one joins in its place; the job finishes by itself, every id
    once (`python -m tests.chaos.report --only spot-week` runs it with 10 kills)."""
    outcome = spot_week(tmp_path, kills=1, rows=150, gap=(2, 4), steps=8)
    print(outcome.describe())
    assert outcome.times == 1, outcome.describe()
    assert outcome.ok, outcome.describe()


def test_on_an_autoscaling_cluster_the_job_asks_for_its_gangs_and_withdraws_at_the_end(tmp_path):
    """A cluster with no worker node yet: the job's pending gang and its request for
    --max-replicas gangs make the autoscaler launch nodes, the job grows onto them, and once the
    rows have run out the request is withdrawn (`request_resources(bundles=[])`)."""
    from tests.autoscaling import autoscaling_cluster

    types = {"cpu1": {"resources": {"CPU": 1}, "max_workers": 3}}
    with autoscaling_cluster(tmp_path, head_cpus=0, worker_types=types, idle_timeout_minutes=10) as cluster:
        job = Job(tmp_path, cluster.address, 120, "--max-replicas", "2", steps=4, env=cluster.env)
        job.wait_for(
            "the job's request for 2 gangs",
            lambda: cluster.resource_request() == [{"CPU": 1.0}] * 2,
            every=1.0,
        )
        assert job.finish() == 0, job.said()
        table = index(job.out)
        assert sorted(r["id"] for r in table) == [f"f/{i:03d}" for i in range(120)]
        assert "the cluster has room for another gang: replica 1 starting" in job.said()  # it grew
        assert len({r["node"] for r in table}) == 2  # rendered on both nodes the autoscaler launched
        assert "replica 2 " not in job.said()  # never more than --max-replicas gangs
        assert cluster.resource_request() == []  # the rows ran out: the request is withdrawn
