"""`--samples N`: the ids of a row's samples k > 0 (`<id>#k`, cogdist.work.sample_id) must not be
ids of the manifest. Checked from the id column alone: only ids of that form are looked at."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cogdist.errors import ManifestProblem

# `<row>#<k>` with k > 0 and at most 9 digits (a larger k is beyond any --samples).
SAMPLE_ID = r"^(?P<row>.*)#(?P<k>[1-9][0-9]{0,8})$"


def sample_collisions(
    ids: list[pa.Array], places: list[tuple[str, int]], samples: int, limit: int
) -> tuple[int, list[ManifestProblem]]:
    """Manifest ids that are also the id of a sample of another row: how many, and a problem for
    the first `limit`. `ids` holds each batch's ids, `places` each batch's file and first row."""
    if samples < 2:
        return 0, []
    column = pa.chunked_array(ids, type=pa.string())
    if not pc.any(pc.match_substring_regex(column, SAMPLE_ID)).as_py():
        return 0, []  # the common case: no id looks like a sample's
    every_id = column.combine_chunks()
    count, problems = 0, []
    for batch_ids, (file, first_row) in zip(ids, places):
        parts = pc.extract_regex(batch_ids, SAMPLE_ID)  # null where an id has no such form
        sample = pc.cast(pc.struct_field(parts, "k"), pa.int64())
        row = pc.struct_field(parts, "row")
        collides = pc.fill_null(pc.and_(pc.less(sample, samples), pc.is_in(row, value_set=every_id)), False)
        hits = pc.indices_nonzero(collides).to_pylist()
        count += len(hits)
        for i in hits[: max(0, limit - len(problems))]:
            problems.append(
                ManifestProblem(
                    f"is the id of sample {sample[i].as_py()} of row {row[i].as_py()!r} under "
                    f"--samples {samples} (samples k > 0 are named '<id>#k'); rename it",
                    file=file,
                    row=first_row + i,
                    id=batch_ids[i].as_py(),
                    column="id",
                )
            )
    return count, problems
