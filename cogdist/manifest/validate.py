"""Manifest checks, run in full before any rendering is scheduled.

Checks are vectorised with pyarrow.compute, one record batch at a time; Python only touches the
rows that fail, to word their message. Duplicate ids are found across all files from the id
column alone, so memory grows with the ids, never with the prompts.

The vocabulary (columns and kinds) is in cogdist.manifest.schema, the rule for input URIs in
cogdist.manifest.uris.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogdist.errors import ManifestError, ManifestProblem
from cogdist.manifest.columns import index_inputs
from cogdist.manifest.samples import sample_collisions
from cogdist.manifest.schema import COLUMNS, CONDITIONING, INTEGER, NULL_AS, NUMBER, check_schema
from cogdist.manifest.source import ManifestBatch, ManifestSource
from cogdist.manifest.uris import ACCEPTED_URI, public_uri, uri_problem
from cogdist.models.registry import TASK_INPUT, VIDEO_TO_VIDEO, ModelSpec

MAX_REPORTED = 20
INT64_MAX = 2**63 - 1
# The CogVideoX schedulers refuse more steps than their 1000 training timesteps, and no sampler
# of these models needs more; a larger count would hold a GPU for days or exhaust its memory.
MAX_STEPS = 1000


@dataclass(frozen=True)
class ValidationReport:
    rows: int
    files: int


def validate_manifest(
    source: ManifestSource, spec: ModelSpec, adapters: tuple[str, ...] = (), samples: int = 1
) -> ValidationReport:
    """Raise ManifestError naming the bad rows (the first MAX_REPORTED) or return a report;
    `adapters`: the names of the job's LoRA adapters, which a `lora` column may name; `samples`:
    outputs per row (--samples), whose ids must not be the manifest's."""
    # A column read under another name (--column-map) is named by both in every message.
    problems = [
        replace(p, source=source.view.manifest_name(p.column or "")) for p in check_schema(source.schema)
    ]
    if problems:
        raise ManifestError(problems)

    found: list[ManifestProblem] = []
    total = 0
    ids: list[pa.Array] = []
    places: list[tuple[str, int]] = []  # per batch: its file's name and its first row there
    # Every column is read, not only cogdist's: a string that is not valid UTF-8 (writers other
    # than Arrow's do not all check) in any column would otherwise fail the render, not the check.
    for part in source.batches():
        check = _check_batch(part, spec, MAX_REPORTED - len(found), adapters)
        total += check.count
        found.extend(check.problems)
        ids.append(pc.cast(check.ids_for_duplicates, pa.string()))
        places.append((part.file.name, part.first_row))
    if ids:
        count, duplicates = _duplicates(ids, places, MAX_REPORTED - len(found))
        total += count
        count, collisions = sample_collisions(
            ids, places, samples, MAX_REPORTED - len(found) - len(duplicates)
        )
        total += count
        found.extend(replace(p, source=source.view.manifest_name("id")) for p in [*duplicates, *collisions])
        del ids
        pa.default_memory_pool().release_unused()  # the ids were the big part; return them
    if total:
        raise ManifestError(found, total=total)
    return ValidationReport(rows=source.num_rows, files=len(source.files))


class _BatchChecker:
    """Collects the failing rows of one batch: counts all, words at most `limit`.

    cogdist's columns are normalised first (integers to int64, numbers to float64, all-null
    columns to their kind's type), so that every later check is one kernel on one type (an int8
    width cannot be filled with a default of 720, a float16 has no comparison kernel). Unsigned
    values beyond int64 are flagged here, once, then read as null; strings of any column that are
    not UTF-8 (Python could not even print them) are flagged here too.
    """

    def __init__(self, part: ManifestBatch, limit: int):
        self.part = part
        self.limit = limit
        self.count = 0
        self.problems: list[ManifestProblem] = []
        self.raw_ids = part.batch.column("id")
        self.invalid_text: dict[str, pa.Array] = {}  # column -> rows that are not valid UTF-8
        # A column shown under two names (--column-map) is one array: checked once, under cogdist's.
        mapped = part.view.mapped if part.view is not None else {}
        self.text_checked: dict[str, pa.Array | None] = {}
        self.flag_as: dict[str, str] = {}
        for name in part.batch.schema.names:
            own = part.manifest_name(name) or name
            if name in mapped or own not in self.flag_as:
                self.flag_as[own] = name
        self.columns: dict[str, pa.Array] = {}
        for index, field in enumerate(part.batch.schema):
            self.columns[field.name] = self._normalise(field.name, part.batch.column(index))
        self.ids = self.columns["id"]
        bad_text = self.invalid_text.get("id")
        # Rows flagged for an id that is not text are left out of the duplicate search.
        self.ids_for_duplicates = self.ids if bad_text is None else pc.if_else(bad_text, None, self.ids)

    def _normalise(self, name: str, values: pa.Array) -> pa.Array:
        own = self.part.manifest_name(name) or name
        if own not in self.text_checked:
            self.text_checked[own] = _invalid_utf8(values)
            if self.text_checked[own] is not None:
                self.flag(self.text_checked[own], self.flag_as[own], "is not valid UTF-8 text")
        bad_text = self.text_checked[own]
        if bad_text is not None:
            self.invalid_text[name] = bad_text
        kind = COLUMNS.get(name)
        if kind is None:
            return values
        if pa.types.is_null(values.type):  # an all-null column: give it its kind's type
            return pc.cast(values, NULL_AS[kind])
        if kind == INTEGER and values.type != pa.int64():
            if values.type == pa.uint64():
                too_big = pc.greater(values, pa.scalar(INT64_MAX, pa.uint64()))
                self.flag(too_big, name, f"is larger than {INT64_MAX} (the index stores int64)")
                values = pc.if_else(too_big, None, values)
            return pc.cast(values, pa.int64())
        if kind == NUMBER and values.type != pa.float64():
            # int64 beyond 2**53 loses precision as a float: fine for a range check.
            return pc.cast(values, pa.float64(), safe=False)
        return values

    def column(self, name: str) -> pa.Array | None:
        return self.columns.get(name)

    def value(self, column: str, index: int) -> object:
        """Row `index`'s value of `column` as the manifest holds it, safe to print."""
        names = self.part.batch.schema.names
        if column not in names:
            return None
        value = _as_py(self.part.batch.column(column), index)
        if column in ("image", "video") and isinstance(value, str):
            value = public_uri(value)  # may hold credentials
        return value

    def flag(self, mask: pa.Array, column: str, reason: Callable[[int], str] | str) -> None:
        mask = pc.fill_null(mask, False)
        bad = pc.sum(mask).as_py() or 0
        if not bad:
            return
        self.count += bad
        room = self.limit - len(self.problems)
        if room <= 0:
            return
        for index in pc.indices_nonzero(mask)[:room].to_pylist():
            item_id = _as_py(self.raw_ids, index)
            self.problems.append(
                ManifestProblem(
                    reason if isinstance(reason, str) else reason(index),
                    file=self.part.file.name,
                    row=self.part.first_row + index,
                    id=item_id if isinstance(item_id, str) else None,
                    column=column,
                    value=self.value(column, index),
                    source=self.part.manifest_name(column),
                )
            )


def _invalid_utf8(values: pa.Array) -> pa.Array | None:
    """Rows of `values` holding a string that is not valid UTF-8 (also nested), or None."""
    try:
        values.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    # Rare and only for a broken batch: find the rows one by one.
    bad = []
    for i in range(len(values)):
        try:
            values.slice(i, 1).validate(full=True)
            bad.append(False)
        except pa.ArrowInvalid:
            bad.append(True)
    return pa.array(bad, pa.bool_())


def _as_py(values: pa.Array, index: int) -> object:
    try:
        return values[index].as_py()
    except UnicodeDecodeError:  # not valid UTF-8: show the bytes as far as they decode
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            raw = pc.cast(values.slice(index, 1), pa.large_binary())[0].as_py()
            return raw.decode("utf-8", "backslashreplace")
        return "<not valid UTF-8>"


def _check_batch(
    part: ManifestBatch, spec: ModelSpec, limit: int, adapters: tuple[str, ...] = ()
) -> _BatchChecker:
    check = _BatchChecker(part, limit)
    n = part.batch.num_rows
    ids = check.ids
    check.flag(pc.is_null(ids), "id", "id is missing")
    check.flag(pc.equal(pc.utf8_length(ids), 0), "id", "id is empty")
    check.flag(pc.is_null(check.column("prompt")), "prompt", "prompt is missing")

    negative = check.column("negative_prompt")
    if negative is not None and not spec.negative_prompt:
        check.flag(
            pc.greater(pc.utf8_length(negative), 0),
            "negative_prompt",
            f"{spec.name} takes no negative prompt (its pipeline has none); leave the column empty",
        )

    seed = check.column("seed")
    if seed is not None:
        check.flag(pc.less(seed, 0), "seed", "seed must be >= 0")

    width, height = check.column("width"), check.column("height")
    if width is not None or height is not None:
        w = pc.fill_null(width, spec.width) if width is not None else pa.array(np.full(n, spec.width))
        h = pc.fill_null(height, spec.height) if height is not None else pa.array(np.full(n, spec.height))
        w_np = w.to_numpy(zero_copy_only=False).astype(np.int64)
        h_np = h.to_numpy(zero_copy_only=False).astype(np.int64)
        rule = spec.sizes
        if rule.only:
            allowed = np.zeros(n, dtype=bool)
            for ow, oh in rule.only:
                allowed |= (w_np == ow) & (h_np == oh)
            bad_w, bad_h = ~allowed & (width is not None), ~allowed & (width is None)
        else:
            bad_w = (w_np % rule.multiple != 0) | (w_np < rule.min_side) | (w_np > rule.max_side)
            bad_h = (h_np % rule.multiple != 0) | (h_np < rule.min_side) | (h_np > rule.max_side)
            bad_h &= ~bad_w
            if rule.max_area is not None:
                bad_h |= ~bad_w & (w_np * h_np > rule.max_area)
            if rule.short_side is not None:
                bad_h |= ~bad_w & (np.minimum(w_np, h_np) != rule.short_side)

        def reason(i: int) -> str:
            return f"{rule.problem(int(w_np[i]), int(h_np[i]))} ({spec.name} takes {rule.describe()})"

        check.flag(pa.array(bad_w), "width", reason)
        check.flag(pa.array(bad_h), "height", reason)

    steps = check.column("num_inference_steps")
    if steps is not None:
        check.flag(pc.less_equal(steps, 0), "num_inference_steps", "must be a positive integer")
        check.flag(pc.greater(steps, MAX_STEPS), "num_inference_steps", f"must be at most {MAX_STEPS}")

    guidance = check.column("guidance_scale")
    if guidance is not None:
        check.flag(pc.invert(pc.is_finite(guidance)), "guidance_scale", "must be a finite number")

    for name in CONDITIONING:
        values = check.column(name)
        if values is not None and name not in spec.conditioning:
            check.flag(
                pc.is_valid(values), name, f"{spec.name} takes no {name!r} input ({spec.describe_tasks()})"
            )
    # Rows' inputs, judged by the columns the model can use (another was flagged just above).
    has_image = _nonempty(check.column("image") if "image" in spec.conditioning else None, n)
    has_video = _nonempty(check.column("video") if "video" in spec.conditioning else None, n)
    if spec.conditioning:
        _check_tasks(check, spec, has_image, has_video)
        _check_input_uris(check, spec)
        for name, mask, reason in index_inputs(part.batch, part.view):  # an index read as manifest
            check.flag(mask, name, reason)

    lora = check.column("lora")
    if lora is not None:
        named = pc.greater(pc.utf8_length(pc.fill_null(lora, "")), 0)
        unknown = pc.invert(pc.is_in(lora, value_set=pa.array(adapters, pa.string())))
        given = ", ".join(adapters) or "none"
        check.flag(pc.and_(named, unknown), "lora", f"names no adapter of this job (--lora names: {given})")

    fps = check.column("fps")
    if fps is not None:
        if spec.kind == "image":
            check.flag(pc.is_valid(fps), "fps", f"{spec.name} makes images; fps is for video models")
        else:
            check.flag(pc.invert(pc.and_(pc.is_finite(fps), pc.greater(fps, 0))), "fps", "must be > 0")

    frames = check.column("num_frames")
    if frames is not None and spec.kind == "image":
        check.flag(
            pc.is_valid(frames), "num_frames", f"{spec.name} makes images; num_frames is for video models"
        )
    elif spec.frames is not None and (frames is not None or spec.num_frames is not None):
        _check_frames(check, spec, frames, has_video)
    return check


def _nonempty(values: pa.Array | None, n: int) -> np.ndarray:
    if values is None:
        return np.zeros(n, dtype=bool)
    present = pc.and_(pc.is_valid(values), pc.greater(pc.utf8_length(pc.fill_null(values, "")), 0))
    return present.to_numpy(zero_copy_only=False)


def _check_tasks(check: _BatchChecker, spec: ModelSpec, has_image: np.ndarray, has_video: np.ndarray) -> None:
    """Every row must map to a task of the model; inputs must not be empty strings."""
    for name in ("image", "video"):
        values = check.column(name)
        if values is not None and name in spec.conditioning:
            check.flag(
                pc.equal(pc.utf8_length(values), 0), name, "is empty; leave it null for rows without one"
            )
    for image in (False, True):
        for video in (False, True):
            if spec.task_for(image, video) is not None:
                continue
            mask = (has_image == image) & (has_video == video)
            if not mask.any():
                continue
            needed = [c for t in spec.tasks if (c := TASK_INPUT[t])]
            if image and video:
                column, reason = "video", "a row takes an image or a video, not both"
            elif image or video:
                column = "image" if image else "video"
                reason = f"{spec.name} takes no {column!r} input ({spec.describe_tasks()})"
            else:
                column = needed[0] if check.column(needed[0]) is not None else "prompt"
                wanted = " or ".join(repr(c) for c in needed)
                reason = f"{spec.name} needs {wanted} on every row ({spec.describe_tasks()})"
                if check.part.view is not None and check.part.view.chained:  # jobs that feed jobs
                    reason += f"; to read the outputs of this index: --column-map {needed[0]}=uri"
            check.flag(pa.array(mask), column, reason)
    strength = check.column("strength")
    if strength is not None:
        finite = pc.is_finite(strength)
        in_range = pc.and_(pc.greater(strength, 0), pc.less_equal(strength, 1))
        check.flag(pc.invert(pc.and_(finite, in_range)), "strength", "must be in (0, 1]")
        if VIDEO_TO_VIDEO in spec.tasks:
            without_video = pc.and_(pc.is_valid(strength), pa.array(~has_video))
            check.flag(
                without_video, "strength", "applies to video-to-video rows only (this row has no 'video')"
            )


def _check_input_uris(check: _BatchChecker, spec: ModelSpec) -> None:
    """An input names a local file or an object; how to reach it is the job's business alone."""
    for name in ("image", "video"):
        values = check.column(name)
        if values is None or name not in spec.conditioning:
            continue
        is_uri = pc.match_substring(values, "://")
        accepted = pc.match_substring_regex(values, ACCEPTED_URI)

        def reason(i: int, name: str = name) -> str:
            text = _as_py(check.part.batch.column(name), i)
            problem = uri_problem(text) if isinstance(text, str) else None
            return problem or "is not an input URI cogdist reads"

        check.flag(pc.and_(is_uri, pc.invert(accepted)), name, reason)


def _check_frames(
    check: _BatchChecker, spec: ModelSpec, frames: pa.Array | None, video_input: np.ndarray
) -> None:
    rule = spec.frames
    if rule is None:
        raise TypeError(f"{spec.name} is a video model without a frame rule")
    n = check.part.batch.num_rows
    default = spec.num_frames or 1
    counts = (
        pc.fill_null(frames, default).to_numpy(zero_copy_only=False).astype(np.int64)
        if frames is not None
        else np.full(n, default, dtype=np.int64)
    )
    problems = {}
    for count in np.unique(counts):  # one check per distinct count and input kind
        for with_video in (False, True):
            problem = rule.problem(int(count), with_video)
            if problem:
                problems[(int(count), with_video)] = problem
    if not problems:
        return
    bad = np.zeros(n, dtype=bool)
    for count, with_video in problems:
        bad |= (counts == count) & (video_input == with_video)

    def reason(i: int) -> str:
        return (
            f"{problems[(int(counts[i]), bool(video_input[i]))]} ({spec.name} takes {rule.describe()} frames)"
        )

    check.flag(pa.array(bad), "num_frames", reason)


def _duplicates(
    ids: list[pa.Array], places: list[tuple[str, int]], limit: int
) -> tuple[int, list[ManifestProblem]]:
    """Ids found more than once (nulls aside): how many, and a problem for the first `limit`.
    `ids` holds each batch's ids, `places` each batch's file name and first row."""
    column = pa.chunked_array(ids, type=pa.string())
    # The common case, no duplicates, costs one distinct count of the ids alone; finding where
    # the duplicates are only runs otherwise.
    if pc.count_distinct(column, mode="only_valid").as_py() == len(column) - column.null_count:
        return 0, []
    counts = pa.table({"id": column}).group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.and_(pc.greater(counts["id_count"], 1), pc.is_valid(counts["id"])))
    wanted = repeated["id"].combine_chunks()
    where: dict[str, list[tuple[str, int]]] = {}
    for batch_ids, (file, first_row) in zip(ids, places):
        hits = pc.indices_nonzero(pc.fill_null(pc.is_in(batch_ids, value_set=wanted), False))
        for i in hits.to_pylist():
            where.setdefault(batch_ids[i].as_py(), []).append((file, first_row + i))
    problems = []
    for item_id, found in list(where.items())[: max(0, limit)]:
        (first_file, first_row), (file, row) = found[0], found[1]
        problems.append(
            ManifestProblem(
                f"duplicate id: also at {first_file} row {first_row}"
                + (f" and {len(found) - 2} more place(s)" if len(found) > 2 else ""),
                file=file,
                row=row,
                id=item_id,
                column="id",
            )
        )
    return repeated.num_rows, problems
