"""The engine in process on the session's Ray: index contract, retries, failures, gang rebuild."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

import cogdist
from cogdist import engine
from cogdist.errors import EXIT_REFUSED, ConfigurationError, GangError, UsageError
from cogdist.options import RenderOptions
from tests.conftest import write_manifest
from tests.faults import PoisonWorker, dying_worker, failing_setup, out_of_memory, timed_worker
from tests.inprocess import render_in_process

# Where the replica count is not the point: one worker (a second costs its start-up), no progress line.
ONE_QUIET_REPLICA = {"progress": False, "replicas": 1}


def manifest_rows(n: int, **extra) -> list[dict]:
    return [
        {"id": f"item/{i:03d}", "prompt": f"prompt number {i}", "tag": f"t{i % 3}", **extra} for i in range(n)
    ]


def index_table(out) -> ds.Dataset:
    return ds.dataset(f"{out}/index").to_table()


def test_render_by_model_path_fills_the_index_once(ray_session, tmp_path, tiny_model_dir):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(6))
    out = tmp_path / "out"
    summary = cogdist.render(
        str(manifest), model=str(tiny_model_dir), out=str(out), batch_size=2, **ONE_QUIET_REPLICA
    )
    assert (summary.done, summary.skipped, summary.failed, summary.ok) == (6, 0, 0, True)
    table = index_table(out)
    assert sorted(table["id"].to_pylist()) == [f"item/{i:03d}" for i in range(6)]
    row = table.filter(ds.field("id") == "item/004").to_pylist()[0]
    assert row["tag"] == "t1" and row["model"] == str(tiny_model_dir) and row["attempts"] == 1
    assert row["uri"] == str(out / row["path"]) and Image.open(row["uri"]).size == (64, 64)
    again = cogdist.render(str(manifest), model=str(tiny_model_dir), out=str(out), **ONE_QUIET_REPLICA)
    assert (again.done, again.skipped) == (0, 6)
    assert index_table(out).num_rows == 6


def test_poison_rows_are_retried_then_recorded_and_the_rest_finish(ray_session, tmp_path):
    rows = manifest_rows(5)
    rows[1]["prompt"] = "poison one"
    rows[3]["prompt"] = "poison two"
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    options = RenderOptions(
        str(manifest), "tiny-cogview4", str(out), batch_size=2, max_retries=2, **ONE_QUIET_REPLICA
    )
    summary = engine.run(options, worker_class=PoisonWorker)
    assert (summary.done, summary.failed, summary.ok, summary.exit_code) == (3, 2, False, 1)
    assert sorted(index_table(out)["id"].to_pylist()) == ["item/000", "item/002", "item/004"]
    failures = ds.dataset(f"{out}/failures").to_table().to_pylist()
    assert sorted(f["id"] for f in failures) == ["item/001", "item/003"]
    assert all(f["attempts"] == 3 and "poisoned prompt" in f["error"] for f in failures)

    status = cogdist.status(str(out), str(manifest))
    assert (status.done, status.failed, status.pending) == (3, 2, 0)

    # A plain re-run skips recorded failures; --retry-failed renders them (here with a healthy worker).
    rerun = engine.run(options)
    assert (rerun.done, rerun.previously_failed, rerun.ok) == (0, 2, False)
    retried = engine.run(
        RenderOptions(str(manifest), "tiny-cogview4", str(out), retry_failed=True, **ONE_QUIET_REPLICA)
    )
    assert (retried.done, retried.skipped, retried.ok) == (2, 3, True)
    assert index_table(out).num_rows == 5
    assert cogdist.status(str(out), str(manifest)).failed == 0


def test_worker_death_rebuilds_the_replica_and_costs_no_attempt(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(8))
    out = tmp_path / "out"
    worker = dying_worker(tmp_path, victim="item/005")
    options = RenderOptions(str(manifest), "tiny-cogview4", str(out), **ONE_QUIET_REPLICA, max_retries=0)
    summary = engine.run(options, worker_class=worker)
    assert (tmp_path / "died").exists(), "the fault was not injected"
    assert (summary.done, summary.failed, summary.ok) == (8, 0, True)
    table = index_table(out)
    assert sorted(table["id"].to_pylist()) == [f"item/{i:03d}" for i in range(8)]


def test_a_setup_that_fails_on_configuration_stops_the_job_at_once(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(3))
    worker = failing_setup(tmp_path, ModuleNotFoundError("No module named 'xformers'"))
    options = RenderOptions(str(manifest), "tiny-cogview4", str(tmp_path / "out"), **ONE_QUIET_REPLICA)
    with pytest.raises(ConfigurationError, match="rebuilding them would not help.*xformers") as raised:
        engine.run(options, worker_class=worker)
    assert raised.value.exit_code == EXIT_REFUSED
    assert len(list(tmp_path.glob("setup-*"))) == 1  # never rebuilt


def test_a_replica_that_crash_loops_is_given_up_after_max_gang_restarts(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(3))
    worker = failing_setup(tmp_path, RuntimeError("CUDA error: device-side assert triggered"))
    options = RenderOptions(
        str(manifest), "tiny-cogview4", str(tmp_path / "out"), **ONE_QUIET_REPLICA, max_gang_restarts=1
    )
    with pytest.raises(GangError, match="every replica failed and was given up"):
        engine.run(options, worker_class=worker)
    assert len(list(tmp_path.glob("setup-*"))) == 2  # the first try and one rebuild


def test_s3_output_through_the_api(ray_session, tmp_path, s3_bucket):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(4))
    out = f"s3://{s3_bucket}/run"
    summary = cogdist.render(
        str(manifest), model="tiny-cogview4", out=out, format="jpeg", **ONE_QUIET_REPLICA
    )
    assert summary.ok and summary.out == out
    from cogdist.storage import open_location

    location = open_location(out)
    table = ds.dataset(location.path("index"), filesystem=location.fs).to_table()
    assert table.num_rows == 4
    for row in table.to_pylist():
        assert row["uri"].startswith(f"s3://{s3_bucket}/run/outputs/") and row["uri"].endswith(".jpg")
        image = Image.open(io.BytesIO(location.read_bytes(row["path"])))
        assert image.format == "JPEG" and image.size == (64, 64)


def test_unknown_option_is_refused():
    with pytest.raises(UsageError, match="colour"):
        cogdist.render("m.parquet", model="tiny-cogview4", out="o", colour="red")


def test_sizes_and_defaults_reach_the_output(ray_session, tmp_path):
    rows = [
        {"id": "wide", "prompt": "x", "width": 128, "height": 64},
        {"id": "default", "prompt": "y", "width": None, "height": None},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    assert cogdist.render(
        str(manifest), model="tiny-cogview4", out=str(out), width=96, height=96, **ONE_QUIET_REPLICA
    ).ok
    table = {r["id"]: r for r in index_table(out).to_pylist()}
    assert (table["wide"]["width"], table["wide"]["height"]) == (128, 64)
    assert (table["default"]["width"], table["default"]["height"]) == (96, 96)
    for row in table.values():
        pixels = np.asarray(Image.open(row["uri"]))
        assert pixels.shape == (row["height"], row["width"], 3)


def test_credentials_never_reach_the_index_records_or_messages(ray_session, tmp_path, s3_server, s3_bucket):
    secret = s3_server["AWS_SECRET_ACCESS_KEY"]
    rows = manifest_rows(3)
    rows[2]["prompt"] = "poison"
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = f"s3://{s3_server['AWS_ACCESS_KEY_ID']}:{secret}@{s3_bucket}/creds"
    options = RenderOptions(str(manifest), "tiny-cogview4", out, max_retries=0, **ONE_QUIET_REPLICA)
    summary = engine.run(options, worker_class=PoisonWorker)
    assert (summary.done, summary.failed) == (2, 1)
    assert secret not in repr(summary)
    from cogdist.storage import open_location

    location = open_location(out)
    for folder in ("index", "failures"):
        table = ds.dataset(location.path(folder), filesystem=location.fs).to_table()
        assert secret not in str(table.to_pylist())
    assert secret not in location.read_bytes("_cogdist/job.json").decode()
    assert secret not in str(cogdist.status(out))


def test_status_of_a_folder_without_a_job(tmp_path):
    with pytest.raises(UsageError, match="holds no cogdist job"):
        cogdist.status(str(tmp_path))


def test_quick_rows_never_wait_behind_a_slow_unit_while_a_replica_is_free(ray_session, tmp_path):
    """A mixed manifest: one slow shape and many quick ones. Nothing is queued behind the slow
    unit, so every quick row is done while it still renders, on the other replica. (The slow unit
    lasts until every quick unit is done: one queued behind it would end only after it.)"""
    rows = [{"id": "slow", "prompt": "a big scene", "width": 128, "height": 64}]
    rows += [{"id": f"quick/{i:02d}", "prompt": f"scene {i}"} for i in range(12)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    log = tmp_path / "log"
    log.mkdir()
    options = RenderOptions(str(manifest), "tiny-cogview4", str(tmp_path / "out"), progress=False, replicas=2)
    summary = engine.run(options, worker_class=timed_worker(log, slow_width=128, wait_for=12))
    assert summary.ok and summary.done == 13
    units = [json.loads(line) for path in log.iterdir() for line in path.read_text().splitlines()]
    slow = next(u for u in units if u["ids"] == ["slow"])
    quick = [u for u in units if u["ids"] != ["slow"]]
    assert len({u["pid"] for u in units}) == 2  # both replicas worked
    assert all(u["end"] < slow["end"] for u in quick), "a quick row waited behind the slow unit"


def test_the_only_replica_is_fed_behind_a_first_unit_of_unknown_cost(ray_session, tmp_path):
    """No other replica could take the next units sooner: they go to the one replica while its
    first unit, whose cost nobody knows until it returns, still stores its outputs (a slow store),
    instead of after it."""
    rows = [{"id": "slow", "prompt": "a big scene", "width": 128, "height": 64}]
    rows += [{"id": f"quick/{i:02d}", "prompt": f"scene {i}"} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    log = tmp_path / "log"
    log.mkdir()
    options = RenderOptions(str(manifest), "tiny-cogview4", str(tmp_path / "out"), progress=False, replicas=1)
    summary = engine.run(
        options, worker_class=timed_worker(log, slow_width=128, wait_for=4, bound=60, storing=True)
    )
    assert summary.ok and summary.done == 5
    units = [json.loads(line) for path in log.iterdir() for line in path.read_text().splitlines()]
    slow = next(u for u in units if u["ids"] == ["slow"])
    assert all(u["end"] < slow["end"] for u in units if u is not slow), (
        "the replica idled behind its first unit"
    )


def test_out_of_memory_is_retried_once_saving_memory_before_it_counts(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(5))
    out = tmp_path / "out"
    log = tmp_path / "calls.jsonl"
    worker = out_of_memory(log, once="item/001", always="item/003")
    options = RenderOptions(
        str(manifest), "tiny-cogview4", str(out), **ONE_QUIET_REPLICA, batch_size=2, max_retries=1
    )
    summary = engine.run(options, worker_class=worker)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert (summary.done, summary.failed) == (4, 1)

    # item/001 ran out of memory once in its batch, then rendered alone with tiling on: no attempt lost.
    table = index_table(out)
    assert sorted(table["id"].to_pylist()) == ["item/000", "item/001", "item/002", "item/004"]
    assert {r["id"]: r["attempts"] for r in table.to_pylist()}["item/001"] == 1
    assert {"ids": ["item/000", "item/001"], "tiling": False, "oom": True} in calls
    assert {"ids": ["item/000", "item/001"], "tiling": True, "oom": False} in calls
    # The settings come back after the retry: later rows render without tiling.
    assert all(not c["tiling"] for c in calls if c["ids"] == ["item/004"])

    # item/003 runs out of memory however it is rendered: each attempt is one plain render and one
    # memory-saving retry, and after --max-retries 1 it is recorded as failed.
    failure = ds.dataset(f"{out}/failures").to_table().to_pylist()
    assert [(f["id"], f["attempts"]) for f in failure] == [("item/003", 2)]
    assert "OutOfMemoryError" in failure[0]["error"]
    retries = [c for c in calls if "item/003" in c["ids"] and c["tiling"] and c["oom"]]
    assert len(retries) == 2


def test_a_row_renders_the_same_alone_in_a_batch_and_with_other_replica_counts(ray_session, tmp_path):
    target = {"id": "target", "prompt": "a red fox in the snow", "seed": 42, "negative_prompt": "blurry"}
    mates = [
        {"id": f"mate-{i}", "prompt": p, "seed": i, "negative_prompt": None}
        for i, p in enumerate(
            [
                "owl",
                "a much longer prompt about a lighthouse on a cliff at dusk",
                "a red cat",
                "koi",
                "ramen with an egg",
            ]
        )
    ]
    crowd = write_manifest(tmp_path / "crowd.parquet", mates[:2] + [target] + mates[2:])
    # Alone: one worker as a replica runs it, in this process, with as many torch threads as the
    # stock pipeline below.
    threads = 2
    images = {"alone": render_in_process([target], "tiny-cogview4", tmp_path / "alone", threads)["target"]}
    runs = {"batched": {"replicas": 1, "batch_size": 4}, "two replicas": {"replicas": 2, "batch_size": 2}}
    for name, options in runs.items():
        out = tmp_path / name.replace(" ", "-")
        summary = cogdist.render(str(crowd), model="tiny-cogview4", out=str(out), progress=False, **options)
        assert summary.ok, summary.describe()
        row = index_table(out).filter(ds.field("id") == "target").to_pylist()[0]
        assert row["seed"] == 42
        images[name] = np.asarray(Image.open(out / row["path"]).convert("RGB"))
    images = {name: image.astype(int) for name, image in images.items()}
    for name in ("batched", "two replicas"):
        assert np.abs(images[name] - images["alone"]).max() <= 1, name

    # Reproducible outside cogdist: the stock diffusers pipeline with a CPU generator.
    from cogdist.models.cogview4.runner import build_tiny

    pipe = build_tiny(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stock = pipe(
            target["prompt"],
            negative_prompt=target["negative_prompt"],
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(42),
        ).images[0]
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(np.asarray(stock).astype(int), images["alone"])


# -- the option declarations (cogdist.options) --------------------------------------------------


def test_worker_settings_are_the_options_declared_for_workers():
    from dataclasses import fields

    from cogdist.options import declared
    from cogdist.worker.settings import WorkerSettings

    declared_for_workers = {name for name, _, _, how in declared() if how.worker}
    assert {f.name for f in fields(WorkerSettings)} == declared_for_workers | {"threads", "return_outputs"}
    options = RenderOptions(
        "m", "tiny-cogview4", "o", vae_tiling=True, collective_timeout=12.0, dataset="parquet"
    )
    settings = engine.worker_settings(options, threads=3)
    assert (settings.vae_tiling, settings.collective_timeout, settings.threads) == (True, 12.0, 3)
    assert settings.return_outputs and not engine.worker_settings(RenderOptions("m", "x", "o")).return_outputs
    # WorkerSettings is derived from the declarations: the defaults are the options' (written once),
    # resolved where None stands for the model's, and the worker imports the same class.
    from cogdist.worker.worker import WorkerSettings as WorkersOwn

    assert WorkersOwn is WorkerSettings
    defaults = WorkerSettings()
    assert defaults.collective_timeout == RenderOptions("m", "x", "o").collective_timeout == 600.0
    assert (defaults.format, defaults.quality, defaults.vae_tiling, defaults.cache) == (
        "png",
        95,
        False,
        "none",
    )


def test_job_settings_keep_the_record_keys_and_rules(tmp_path):
    from cogdist.models.registry import PRESETS, with_defaults
    from tests.test_job_record_compat import RECORDED_KEYS

    spec = with_defaults(PRESETS["tiny-cogview4"], num_inference_steps=6)
    options = RenderOptions("m", "tiny-cogview4", "o", steps=6, replicas=3)
    job = options.resolved(spec).job_settings(spec, ["id", "prompt"])
    # 0.1.0's keys, and those added since: null at their default, so an older record resumes.
    added = [
        "attention_backend",
        "quantize",
        "quantize_text_encoder",
        "column_map",
        "lora",
        "fuse_lora",
        "samples",
    ]
    assert sorted(job.settings) == sorted([*RECORDED_KEYS, *added])
    assert all(job.settings[key] is None for key in added)
    assert job.settings["num_inference_steps"] == 6 and job.settings["model"] == spec.name
    assert (job.settings["dataset"], job.settings["cache"], job.settings["vae_tiling"]) == (None, None, False)
    assert job.settings["columns"] == ["id", "prompt"]
    assert job.flags["num_inference_steps"] == "--steps"
    # Recorded only: free to change on resume, and never the paths or address (credentials).
    assert job.recorded["replicas"] == 3 and not {"manifest", "out", "address"} & set(job.recorded)
    assert job.recorded["compile"] is False  # rounding only (tests/test_compile.py): a resume may change it
    assert not set(job.recorded) & set(job.settings)


def test_reserved_manifest_columns_are_the_index_columns_the_manifest_lacks():
    from cogdist.manifest.schema import COLUMNS, RESERVED
    from cogdist.sink.ledger import RESULT_FIELDS

    assert set(RESERVED) == {f.name for f in RESULT_FIELDS} - set(COLUMNS)
    assert "sample_key" in RESERVED and "seed" not in RESERVED
