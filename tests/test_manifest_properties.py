"""Property tests of the manifest path: reading, validation, rows to WorkItems, output names.

Whatever a manifest holds (wrong types, nulls, huge prompts, absurd or non-finite numbers, hostile
ids, duplicate ids across files, no rows, damaged files, hostile input URIs), the checks either
accept it or raise a CogdistError whose message names where the problem is; nothing else
escapes. What they accept turns into WorkItems whose outputs stay inside OUT, one per id.
"""

from __future__ import annotations

import array as array_module
import itertools
import math
import posixpath
import random
import re
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from cogdist.errors import CogdistError, ManifestError
from cogdist.manifest import ManifestSource, validate_manifest
from cogdist.manifest.rows import RowDefaults, work_items
from cogdist.manifest.schema import COLUMNS
from cogdist.manifest.uris import ACCEPTED_URI, uri_problem
from cogdist.manifest.validate import MAX_STEPS
from cogdist.models.registry import VIDEO_TO_VIDEO, ModelSpec, resolve_model
from cogdist.scheduler.pending import pending_rows, scan_pending
from cogdist.sink.naming import OUTPUTS, frames_folder, output_path
from cogdist.storage import open_location
from cogdist.worker.inputs import InputError, load_inputs
from tests.conftest import cli, write_manifest

MODELS = [
    "tiny-cogview4",
    "tiny-cogvideox",
    "tiny-cogvideox1.5",
    "tiny-cogvideox-i2v",
    "tiny-cogvideox-fun",
    "tiny-glm-image",
    "THUDM/CogView4-6B",
    "THUDM/CogVideoX-5b",
    "THUDM/CogVideoX1.5-5B-I2V",
]
SPECS = {name: resolve_model(name) for name in MODELS}
SECRET = "SeCrEt-4711"  # planted in hostile URIs; must never reach a message
INT64_MAX = 2**63 - 1

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# -- values ----------------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../etc/passwd",
    "/absolute/path",
    "..",
    ".",
    "a/../../b",
    "C:\\windows\\system32",
    "..\\..\\x",
    "%2e%2e%2f",
    "id\x00nul",
    "tab\tnew\nline",
    "ünïcødé ☃ 雪",
    "NUL",
    " ",
    "x" * 3000,
]
ids = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE_IDS))
prompts = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "a red fox", "x" * 200_000, "☃" * 10_000, "\x00"]),
)

GOOD_URIS = [
    "s3://bucket/cond/cat.png",
    "s3a://bucket/cat.png",
    "S3://Bucket.Name_1/cat.png",
    "gs://bucket/deep/path/clip.mp4",
    "file:///nonexistent/cogdist/cat.png",
    "file://localhost/nonexistent/cogdist/cat.png",
    "nonexistent-cogdist/cat.png",
    "/nonexistent/cogdist/with space/ü.png",
    "/nonexistent/cogdist/a?b#c.png",  # a local path: '?' and '#' are plain characters
    "~/nonexistent-cogdist/x.png",
    "../nonexistent-cogdist/../x.png",
]
BAD_URIS = [
    "s3://bucket/x.png?endpoint_override=evil.example.com",
    "s3://bucket/x.png?scheme=http",
    "s3://bucket/x.png?role_arn=arn:aws:iam::1:role/x",
    "s3://bucket/x.png?",
    f"s3://AKIA:{SECRET}@bucket/x.png",
    f"s3://:{SECRET}@bucket/x.png",
    f"s3://bucket/x.png?access_key=AKIA&secret_key={SECRET}",
    f"s3://bucket/x.png?token={SECRET}",
    f"s3://bucket/x.png?x={SECRET}",
    f"s3a://u:{SECRET}@bucket/x.png",
    "gs://bucket/x.png?endpoint_override=evil.example.com",
    f"gs://user:{SECRET}@bucket/x.png",
    "http://evil.example.com/x.png",
    "https://evil.example.com/x.png",
    "hdfs://namenode/x.png",
    "ftp://host/x.png",
    "s3://evil.example.com:9000/x.png",
    "s3:///x.png",
    "s3://",
    "s3://bucket/x.png#fragment",
    "file://host/etc/passwd",
    "file:///x.png?y=1",
    " s3://bucket/x.png",
    "S3://bucket/x.png?endpoint_override=evil",
    "ſ3://bucket/x.png",
    "s3://[::1/x.png",
    f"{SECRET}:x@s3://bucket/x.png",
    f"s3://k:{SECRET}@[bad/x",
    "dir/a://b.png",
]
uri_pieces = st.lists(
    st.sampled_from([*"ab3:/@?#&=.-_ \\[]%\nſK", "s3", "S3", "s3a", "gs", "file", "://", "localhost"]),
    max_size=12,
).map("".join)
uris = st.one_of(st.sampled_from(GOOD_URIS), st.sampled_from(BAD_URIS), uri_pieces)


def uri_is_hostile(uri: str) -> bool:
    """An independent statement of what the validator must refuse (urllib, not its regex)."""
    if "://" not in uri:
        return False
    scheme = uri.partition("://")[0]
    try:
        parts = urlsplit(uri)
    except ValueError:
        return True
    if not scheme.isascii() or scheme.lower() not in ("file", "s3", "s3a", "gs"):
        return True
    if parts.scheme != scheme.lower() or "?" in uri or "#" in uri or "@" in parts.netloc:
        return True
    if parts.username is not None or parts.password is not None:
        return True
    if scheme.lower() == "file":
        return parts.netloc not in ("", "localhost")
    return not parts.netloc or any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in parts.netloc)


def allowed_sizes(spec: ModelSpec) -> list[tuple[int, int]]:
    rule = spec.sizes
    if rule.only:
        return list(rule.only)
    sides = range(rule.min_side, rule.max_side + 1, rule.multiple)
    return [(w, h) for w in sides for h in sides if rule.problem(w, h) is None]


SIZES = {name: allowed_sizes(spec) for name, spec in SPECS.items()}


def allowed_frames(spec: ModelSpec, with_video: bool) -> list[int]:
    rule = spec.frames
    if rule is None:
        return []
    return [f for f in range(1, min(rule.max_frames, 200) + 1) if rule.problem(f, with_video) is None]


# -- manifests -------------------------------------------------------------------------------

INT_TYPES = [pa.int64(), pa.int32(), pa.int16(), pa.int8(), pa.uint8(), pa.uint64()]
FLOAT_TYPES = [pa.float64(), pa.float32(), pa.float16(), pa.int64()]


def to_array(values: list, preferred: pa.DataType) -> pa.Array:
    """`values` as `preferred`, else the first type that holds them, else their text."""
    for t in (preferred, pa.int64(), pa.uint64(), pa.float64(), None):
        try:
            return pa.array(values, type=t)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            continue
    return pa.array([None if v is None else repr(v) for v in values], pa.string())


@st.composite
def manifests(draw):
    """(model name, files as tables, what must be refused) for a model and a hostile-ish manifest."""
    name = draw(st.sampled_from(MODELS))
    spec = SPECS[name]
    n = draw(st.integers(0, 8))
    hostile = draw(st.integers(0, 3))  # 0: aim for a valid manifest; more: more hostility
    bad = lambda: hostile and draw(st.integers(0, 9)) < 2 * hostile  # noqa: E731

    pool = draw(st.lists(ids, min_size=n, max_size=n, unique=True))
    if n and bad():  # a few repeated ids, maybe in different files
        pool = [draw(st.sampled_from(pool)) if draw(st.booleans()) else i for i in pool]
    video_model = spec.kind == "video"
    columns: dict[str, list] = {"id": pool, "prompt": [draw(prompts) for _ in range(n)]}
    must_refuse: list[str] = []

    for column in ("negative_prompt", "seed", "width", "num_inference_steps", "guidance_scale", "extra"):
        if draw(st.booleans()):
            columns[column] = []
    if video_model and draw(st.booleans()):
        columns["num_frames"] = []
        if draw(st.booleans()):
            columns["fps"] = []
    if "width" in columns and draw(st.booleans()):
        columns["height"] = []
    needs = {t for t in spec.tasks}
    image_needed = "image" in spec.conditioning and not any(
        t in needs for t in ("text-to-image", "text-to-video")
    )
    video_needed = "video" in spec.conditioning and not any(
        t in needs for t in ("text-to-image", "text-to-video", "image-to-video")
    )
    if "image" in spec.conditioning:
        columns["image"] = []
    if "video" in spec.conditioning:
        columns["video"] = []
        if VIDEO_TO_VIDEO in spec.tasks:
            columns["strength"] = []

    for _ in range(n):
        with_image = "image" in columns and (image_needed or draw(st.booleans()))
        with_video = "video" in columns and not with_image and (video_needed or draw(st.booleans()))
        size = draw(st.sampled_from(SIZES[name]))
        for column, values in columns.items():
            if column in ("id", "prompt"):
                continue
            if column == "negative_prompt":
                value = draw(st.one_of(st.none(), st.text(max_size=20))) if spec.negative_prompt else None
            elif column == "seed":
                value = draw(st.one_of(st.none(), st.integers(0, INT64_MAX)))
            elif column == "width":
                value = size[0]
            elif column == "height":
                value = size[1]
            elif column == "num_frames":
                value = draw(st.sampled_from(allowed_frames(spec, with_video)))
            elif column == "num_inference_steps":
                value = draw(st.one_of(st.none(), st.integers(1, MAX_STEPS)))
            elif column in ("guidance_scale", "fps"):
                low = 0.1 if column == "fps" else -50.0
                value = draw(st.one_of(st.none(), st.floats(low, 60.0)))
            elif column == "image":
                value = draw(st.sampled_from(GOOD_URIS)) if with_image else None
            elif column == "video":
                value = draw(st.sampled_from(GOOD_URIS)) if with_video else None
            elif column == "strength":
                value = draw(st.one_of(st.none(), st.floats(0.01, 1.0))) if with_video else None
            else:  # a column cogdist only carries
                value = draw(st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5)))
            values.append(value)

    # Hostility: replace single values, or a whole column's type.
    hostile_values = {
        "id": st.one_of(st.none(), st.just(""), ids),
        "prompt": st.one_of(st.none(), prompts),
        "negative_prompt": st.one_of(st.none(), st.text(max_size=5)),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "width": st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-64, 4096)),
        "height": st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-64, 4096)),
        "num_frames": st.integers(-(2**31), 2**31),
        "num_inference_steps": st.integers(-(2**63), INT64_MAX),
        "guidance_scale": st.floats(allow_nan=True, allow_infinity=True),
        "fps": st.floats(allow_nan=True, allow_infinity=True),
        "strength": st.floats(allow_nan=True, allow_infinity=True),
        "image": st.one_of(st.just(""), uris),
        "video": st.one_of(st.just(""), uris),
        "extra": st.one_of(st.floats(), st.text()),
    }
    for column, values in columns.items():
        for i in range(n):
            if bad():
                values[i] = draw(hostile_values.get(column, st.none()))

    types: dict[str, pa.DataType] = {}
    for column in columns:
        kind = COLUMNS.get(column)
        if kind == "integer":
            types[column] = draw(st.sampled_from(INT_TYPES))
        elif kind == "number":
            types[column] = draw(st.sampled_from(FLOAT_TYPES))
        else:
            types[column] = draw(st.sampled_from([pa.string(), pa.string(), pa.large_string()]))
        if bad() and draw(st.integers(0, 3)) == 0:  # the wrong type for the whole column
            types[column] = draw(
                st.sampled_from([pa.null(), pa.bool_(), pa.string(), pa.float64(), pa.int64()])
            )
            if types[column] == pa.null():
                columns[column] = [None] * n
            elif types[column] == pa.bool_():
                columns[column] = [draw(st.booleans()) for _ in range(n)]
            elif types[column] == pa.string():
                columns[column] = [None if v is None else str(v) for v in columns[column]]
    if bad() and draw(st.booleans()):
        dropped = draw(st.sampled_from(sorted(columns)))
        del columns[dropped]
        if dropped in ("id", "prompt"):
            must_refuse.append(f"no {dropped} column")

    table = pa.table({c: to_array(v, types[c]) for c, v in columns.items()}) if columns else None
    assume(table is not None)

    # What the checks must refuse, judged independently of how they do it.
    for column in table.column_names:
        kind = COLUMNS.get(column)
        t = table.schema.field(column).type
        ok = (
            pa.types.is_null(t)
            or {
                "string": pa.types.is_string(t) or pa.types.is_large_string(t),
                "integer": pa.types.is_integer(t),
                "number": pa.types.is_integer(t) or pa.types.is_floating(t),
                None: True,
            }[kind]
        )
        if not ok:
            must_refuse.append(f"{column} has type {t}")
    if not must_refuse:
        rows = table.to_pylist()
        seen = set()
        for i, row in enumerate(rows):
            item_id = row.get("id")
            if item_id is None or item_id == "" or row.get("prompt") is None:
                must_refuse.append(f"row {i}: id or prompt missing")
            if item_id in seen:
                must_refuse.append(f"row {i}: duplicate id")
            seen.add(item_id)
            seed = row.get("seed")
            if seed is not None and not 0 <= seed <= INT64_MAX:
                must_refuse.append(f"row {i}: seed {seed}")
            steps = row.get("num_inference_steps")
            if steps is not None and not 1 <= steps <= MAX_STEPS:
                must_refuse.append(f"row {i}: steps {steps}")
            guidance = row.get("guidance_scale")
            if guidance is not None and not math.isfinite(guidance):
                must_refuse.append(f"row {i}: guidance {guidance}")
            w = spec.width if row.get("width") is None else row["width"]
            h = spec.height if row.get("height") is None else row["height"]
            if spec.sizes.problem(w, h):
                must_refuse.append(f"row {i}: size {w}x{h}")
            for column in ("image", "video"):
                if row.get(column) is not None and uri_is_hostile(row[column]):
                    must_refuse.append(f"row {i}: {column} {row[column]!r}")

    # One to three files: contiguous slices of the table, the same schema.
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=2)))
    bounds = [0, *cuts, n]
    files = [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    return name, files, must_refuse


def write_files(folder, files: list[pa.Table]) -> str:
    folder.mkdir(parents=True)
    for k, table in enumerate(files):
        pq.write_table(table, folder / f"part-{k}.parquet")
    return str(folder)


_examples = itertools.count()


def fresh(tmp_path):
    """A new folder per example: tmp_path is shared by every example of a test."""
    return tmp_path / f"example-{next(_examples)}"


# -- the checks of a refusal and of what is accepted -------------------------------------------


def assert_refusal_is_clear(error: CogdistError, manifest_files: list[str] | None = None) -> None:
    message = str(error)
    assert message.strip()
    assert "Traceback" not in message
    assert SECRET not in message, message
    if isinstance(error, ManifestError):
        assert error.problems and error.total >= len(error.problems)
        for problem in error.problems:
            assert problem.reason.strip()
            if problem.row is not None:
                # A row problem names the file, the row and the column.
                assert problem.file and problem.column, problem
                assert problem.file in message and f"row {problem.row}" in message
                assert f"column {problem.column!r}" in message
                if manifest_files is not None:
                    assert any(problem.file.endswith(f) for f in manifest_files), problem.file
            assert problem.reason in message


def assert_output_is_inside_out(path: str) -> None:
    assert not path.startswith("/") and "\\" not in path and ":" not in path
    assert posixpath.normpath(path) == path
    parts = path.split("/")
    assert parts[0] == OUTPUTS and len(parts) == 3
    assert all(p and p not in (".", "..") and not p.startswith(".") for p in parts), path
    assert all(c.isascii() and (c.isalnum() or c in "._-/") for c in path), path
    assert posixpath.normpath(posixpath.join("/OUT", path)).startswith("/OUT/outputs/")


def check_manifest(uri: str, name: str, save_frames: bool, files: list[str] | None = None) -> list | None:
    """Validate `uri` for `name`; None if refused (clearly), else its WorkItems (all checked)."""
    spec = SPECS[name]
    try:
        source = ManifestSource(uri)
        report = validate_manifest(source, spec)
    except CogdistError as e:
        assert_refusal_is_clear(e, files)
        return None
    defaults = RowDefaults("mp4" if spec.kind == "video" else "png", save_frames=save_frames)
    items = [item for part in source.batches() for item, _ in work_items(part.batch, spec, defaults)]
    assert len(items) == report.rows == source.num_rows

    outputs = [item.output for item in items]
    assert len(set(outputs)) == len(items) == len({i.id for i in items})
    assert len({o.lower() for o in outputs}) == len(outputs)  # case-insensitive file systems too
    for item in items:
        assert_output_is_inside_out(item.output)
        if item.frames_dir is not None:
            assert_output_is_inside_out(item.frames_dir)
        assert spec.sizes.problem(item.width, item.height) is None
        assert 1 <= item.num_inference_steps <= MAX_STEPS and 0 <= item.seed <= INT64_MAX
        assert math.isfinite(item.guidance_scale)
        if spec.kind == "video":
            assert spec.frames.problem(item.num_frames, item.video is not None) is None
            assert item.fps > 0 and math.isfinite(item.fps)
        assert spec.task_for(item.image is not None, item.video is not None) == item.task
        if item.strength is not None:
            assert 0 < item.strength <= 1

    # The same items through the resume path: nothing done yet, so every row, in order.
    empty = pa.array([], pa.string())
    pending = scan_pending(source, empty, empty)
    assert pending.pending == len(items)
    assert [item.id for item, _ in pending_rows(source, pending, spec, defaults)] == [i.id for i in items]
    return items


# -- properties ------------------------------------------------------------------------------


@PROPERTY
@given(case=manifests(), save_frames=st.booleans())
def test_any_manifest_is_accepted_or_refused_clearly(tmp_path, case, save_frames):
    name, files, must_refuse = case
    uri = write_files(fresh(tmp_path), files)
    items = check_manifest(uri, name, save_frames, [f"part-{k}.parquet" for k in range(len(files))])
    if must_refuse:
        assert items is None, f"accepted although: {must_refuse}"
    event("refused" if items is None else "accepted" if items else "accepted, no rows")
    if items is None:
        return
    # Inputs are only looked at when a row renders: a missing one fails that row alone, and
    # the error names it. (Object-store inputs: test_a_missing_object_fails_its_row_alone.)
    for item in items[:3]:
        uris = [u for u in (item.image, item.video) if u and not u.lower().startswith(("s3", "gs"))]
        if not uris:
            continue
        with pytest.raises(InputError) as failed:
            load_inputs(item)
        assert any(open_location(u).public_uri in str(failed.value) for u in uris), str(failed.value)


@PROPERTY
@given(
    name=st.sampled_from(MODELS),
    files=st.lists(st.lists(ids, max_size=6), min_size=1, max_size=3),
)
def test_duplicate_ids_across_files_are_named_with_both_places(tmp_path, name, files):
    folder = fresh(tmp_path)
    for k, file_ids in enumerate(files):
        write_manifest(
            folder / f"part-{k}.parquet",
            [{"id": i, "prompt": "p"} for i in file_ids],
            schema=pa.schema([("id", pa.string()), ("prompt", pa.string())]),
        )
    everything = [i for file_ids in files for i in file_ids]
    spec = SPECS[name]
    refused = None
    try:
        validate_manifest(ManifestSource(str(folder)), spec)
    except ManifestError as e:
        refused = e
        assert_refusal_is_clear(e)
    repeated = {i for i in everything if everything.count(i) > 1}
    empty = "" in everything
    needs_input = bool(everything) and spec.task_for(False, False) is None
    if not repeated and not empty and not needs_input:
        assert refused is None
        return
    assert refused is not None
    duplicates = [p for p in refused.problems if p.reason.startswith("duplicate id")]
    if repeated and not empty and not needs_input:
        assert {p.id for p in duplicates} == repeated or len(refused.problems) == 20
        for p in duplicates:
            assert p.column == "id" and p.row is not None and "also at" in p.reason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32),
    cut=st.floats(0.0, 1.0),
    flips=st.integers(0, 6),
    kind=st.sampled_from(["truncate", "flip", "both", "text", "empty", "random"]),
)
def test_damaged_and_foreign_files_are_refused_clearly(tmp_path, seed, cut, flips, kind):
    rng = random.Random(seed)
    folder = fresh(tmp_path)
    good = write_manifest(
        folder / "m.parquet",
        [{"id": f"row-{i}", "prompt": "p" * i, "width": 64, "seed": i} for i in range(20)],
    )
    data = bytearray(good.read_bytes())
    if kind in ("truncate", "both"):
        data = data[: int(len(data) * cut)]
    if kind in ("flip", "both"):
        for _ in range(flips):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
    if kind == "text":
        data = bytearray(b"id,prompt\na,b\n")
    if kind == "empty":
        data = bytearray()
    if kind == "random":
        data = bytearray(rng.randbytes(rng.randrange(1, 4000)))
    good.write_bytes(bytes(data))
    check_manifest(str(good), "tiny-cogview4", False, ["m.parquet"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(HOSTILE_IDS)), unique=True, max_size=30))
def test_distinct_ids_get_distinct_names_inside_out(item_ids):
    for extension in ("png", "mp4"):
        names = [output_path(i, extension) for i in item_ids]
        for path in names:
            assert_output_is_inside_out(path)
        assert len(set(names)) == len({n.lower() for n in names}) == len(item_ids)
    for i in item_ids:
        assert_output_is_inside_out(frames_folder(i))
        assert output_path(i, "png") == output_path(i, "png")


@settings(max_examples=400, deadline=None)
@given(st.one_of(uris, st.text(), st.sampled_from(GOOD_URIS + BAD_URIS)))
def test_the_uri_rule_is_one_rule(uri):
    """The columnar pattern, its worded twin, and urllib's reading agree on every string."""
    accepted_by_pattern = pc.match_substring_regex(pa.array([uri]), ACCEPTED_URI)[0].as_py()
    if "://" in uri:
        assert accepted_by_pattern == (uri_problem(uri) is None), uri
    else:
        assert uri_problem(uri) is None
    if uri_problem(uri) is None:
        assert not uri_is_hostile(uri), uri


@PROPERTY
@given(
    name=st.sampled_from(["tiny-glm-image", "tiny-cogvideox", "tiny-cogvideox-i2v", "tiny-cogvideox-fun"]),
    values=st.lists(uris, min_size=1, max_size=6),
)
def test_hostile_input_uris_are_refused_per_row_without_secrets(tmp_path, name, values):
    spec = SPECS[name]
    column = "image" if "image" in spec.conditioning else "video"
    path = write_manifest(
        fresh(tmp_path) / "m.parquet",
        [{"id": f"r{i}", "prompt": "p", column: v} for i, v in enumerate(values)],
    )
    try:
        validate_manifest(ManifestSource(str(path)), spec)
        refused = None
    except ManifestError as e:
        refused = e
        assert_refusal_is_clear(e, ["m.parquet"])
    hostile = [i for i, v in enumerate(values) if v and uri_is_hostile(v)]
    if hostile:
        assert refused is not None
        named = {p.row for p in refused.problems if p.column == column}
        assert set(hostile) <= named, (hostile, str(refused))


def unchecked_strings(values: list[bytes | None], large: bool = False) -> pa.Array:
    """A string array holding `values` as they are: Arrow does not check UTF-8 when built so,
    and neither do all Parquet writers."""
    offsets, data = [0], b""
    for v in values:
        data += v or b""
        offsets.append(len(data))
    valid = pa.array([v is not None for v in values], pa.bool_()).buffers()[1]
    width = "q" if large else "i"
    return pa.Array.from_buffers(
        pa.large_string() if large else pa.string(),
        len(values),
        [valid, pa.py_buffer(array_module.array(width, offsets).tobytes()), pa.py_buffer(data)],
    )


@PROPERTY
@given(
    column=st.sampled_from(["id", "prompt", "image", "caption"]),
    values=st.lists(
        st.one_of(st.binary(max_size=8), st.text(max_size=8).map(str.encode)), min_size=1, max_size=8
    ),
    large=st.booleans(),
)
def test_text_that_is_not_utf8_is_refused_per_row(tmp_path, column, values, large):
    n = len(values)
    table = {"id": pa.array([f"r{i}" for i in range(n)]), "prompt": pa.array(["p"] * n)}
    table[column] = unchecked_strings([v if column in ("id", "prompt") else v or None for v in values], large)
    path = fresh(tmp_path) / "m.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table(table), path)
    broken = set()
    for i, v in enumerate(values):
        try:
            v.decode("utf-8")
        except UnicodeDecodeError:
            broken.add(i)
    items = check_manifest(str(path), "tiny-glm-image", False, ["m.parquet"])
    if broken:
        assert items is None
        with pytest.raises(ManifestError) as refused:
            validate_manifest(ManifestSource(str(path)), SPECS["tiny-glm-image"])
        named = {p.row for p in refused.value.problems if p.reason == "is not valid UTF-8 text"}
        assert named == broken and all(
            p.column == column for p in refused.value.problems if p.reason == "is not valid UTF-8 text"
        )


# -- not hypothesis ----------------------------------------------------------------------------


def test_every_damaged_footer_byte_is_refused_clearly(tmp_path):
    """The footer is where damage turns into odd exception types (ArrowNotImplementedError for a
    bit width over 64, UnicodeDecodeError for a column name): every byte of it, changed."""
    good = write_manifest(
        tmp_path / "good.parquet", [{"id": f"row-{i}", "prompt": "p", "seed": i} for i in range(3)]
    )
    data = good.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little")
    damaged = tmp_path / "m.parquet"
    for position in range(len(data) - 8 - footer, len(data)):
        for value in {0x00, data[position] ^ 0x80} - {data[position]}:
            damaged.write_bytes(data[:position] + bytes([value]) + data[position + 1 :])
            check_manifest(str(damaged), "tiny-cogview4", False, ["m.parquet"])


REGRESSIONS = {
    # (model, table, expected fragment of the message, or None: accepted)
    "int8 width with a null (the default 720 does not fit int8)": (
        "THUDM/CogVideoX-5b",
        pa.table({"id": ["a", "b"], "prompt": ["p", "p"], "width": pa.array([None, 100], pa.int8())}),
        "row 1, id 'b', column 'width' = 100",
    ),
    "uint8 width with a null": (
        "THUDM/CogView4-6B",
        pa.table({"id": ["a"], "prompt": ["p"], "width": pa.array([None], pa.uint8())}),
        None,
    ),
    "float16 strength": (
        "tiny-cogvideox",
        pa.table(
            {"id": ["a"], "prompt": ["p"], "video": ["v.mp4"], "strength": pa.array([0.5], pa.float16())}
        ),
        None,
    ),
    "float16 strength out of range": (
        "tiny-cogvideox",
        pa.table(
            {"id": ["a"], "prompt": ["p"], "video": ["v.mp4"], "strength": pa.array([2.0], pa.float16())}
        ),
        "column 'strength' = 2.0: must be in (0, 1]",
    ),
    "an all-null id column": (
        "tiny-cogview4",
        pa.table({"id": pa.array([None], pa.null()), "prompt": ["p"]}),
        "row 0, column 'id': id is missing",
    ),
    "two prompt columns": (
        "tiny-cogview4",
        pa.Table.from_arrays([pa.array(["a"]), pa.array(["p"]), pa.array(["q"])], ["id", "prompt", "prompt"]),
        "column 'prompt': appears more than once",
    ),
    "two extra columns of one name": (
        "tiny-cogview4",
        pa.Table.from_arrays(
            [pa.array(["a"]), pa.array(["p"]), pa.array([1]), pa.array([2])], ["id", "prompt", "x", "x"]
        ),
        "column 'x': appears more than once",
    ),
    "a uint64 seed beyond int64 (the index column)": (
        "tiny-cogview4",
        pa.table({"id": ["a"], "prompt": ["p"], "seed": pa.array([2**64 - 1], pa.uint64())}),
        "row 0, id 'a', column 'seed' = 18446744073709551615: is larger than 9223372036854775807",
    ),
    "a uint64 seed within int64": (
        "tiny-cogview4",
        pa.table({"id": ["a"], "prompt": ["p"], "seed": pa.array([2**63 - 1], pa.uint64())}),
        None,
    ),
    "absurd step count": (
        "tiny-cogvideox",
        pa.table({"id": ["a"], "prompt": ["p"], "num_inference_steps": [1001]}),
        "column 'num_inference_steps' = 1001: must be at most 1000",
    ),
    "an integer guidance column": (
        "tiny-cogview4",
        pa.table({"id": ["a"], "prompt": ["p"], "guidance_scale": pa.array([2**62], pa.int64())}),
        None,
    ),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_column_types_that_used_to_escape_the_checks(tmp_path, case):
    name, table, expected = REGRESSIONS[case]
    pq.write_table(table, tmp_path / "m.parquet")
    items = check_manifest(str(tmp_path / "m.parquet"), name, False, ["m.parquet"])
    if expected is None:
        assert items is not None and len(items) == table.num_rows
        return
    with pytest.raises(ManifestError, match=re.escape(expected)):
        validate_manifest(ManifestSource(str(tmp_path / "m.parquet")), SPECS[name])


def test_a_missing_object_fails_its_row_alone(tmp_path, s3_bucket):
    """A URI to a missing object passes the manifest checks; loading it fails with its name."""
    spec = SPECS["tiny-glm-image"]
    uri = f"s3://{s3_bucket}/cond/missing.png"
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", "image": uri}])
    source = ManifestSource(str(path))
    validate_manifest(source, spec)
    [(item, _)] = [
        pair for part in source.batches() for pair in work_items(part.batch, spec, RowDefaults("png"))
    ]
    with pytest.raises(InputError, match=rf"{uri} does not exist"):
        load_inputs(item)


def test_cli_refuses_hostile_manifests_without_a_traceback(tmp_path):
    bad_text = pa.Array.from_buffers(
        pa.string(),
        2,
        [None, pa.py_buffer(bytes([0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0])), pa.py_buffer(b"a\xff\xfe")],
    )
    hostile = pa.table(
        {
            "id": bad_text,
            "prompt": ["p", "q"],
            "seed": pa.array([2**64 - 1, 1], pa.uint64()),
            "guidance_scale": pa.array([1.0, math.nan], pa.float16()),
            "num_inference_steps": [10**12, 4],
        }
    )
    pq.write_table(hostile, tmp_path / "types.parquet")
    write_manifest(
        tmp_path / "uris.parquet",
        [
            {"id": "ok", "prompt": "p", "image": "s3://bucket/cat.png"},
            {"id": "evil", "prompt": "p", "image": "s3://bucket/cat.png?endpoint_override=evil.example.com"},
            {"id": "creds", "prompt": "p", "image": f"s3://AKIA:{SECRET}@bucket/cat.png"},
        ],
    )
    cases = {
        "types.parquet": (
            "tiny-cogview4",
            [
                "row 1, id '\\\\xff\\\\xfe', column 'id'",
                "is not valid UTF-8",
                "row 0, id 'a', column 'seed' = 18446744073709551615",
                "row 1, id",
                "column 'guidance_scale' = nan",
                "row 0, id 'a', column 'num_inference_steps' = 1000000000000: must be at most 1000",
            ],
        ),
        "uris.parquet": (
            "tiny-glm-image",
            [
                "row 1, id 'evil', column 'image'",
                "carries query options",
                "row 2, id 'creds', column 'image' = 's3://***@bucket/cat.png'",
                "carries credentials",
            ],
        ),
    }
    for file, (model, expected) in cases.items():
        result = cli("validate", str(tmp_path / file), "--model", model, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
        assert file in result.stderr
        for text in expected:
            assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
