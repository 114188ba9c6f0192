"""Write manifests/demo-video.parquet: 12 rows for `tiny-cogvideox` with mixed sizes, frames and fps.

    python manifests/make_demo_video.py [OUT.parquet]

Text-to-video rows only (no input files needed): sizes 64x64 and 96x64, 9 or 17 frames, one row
with its own fps, and `category`, an extra column carried into the index. Rows with a `video`
column (a local path or URI) would render as video-to-video with the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    ("waves rolling onto a beach at sunset", "nature"),
    ("a red fox trotting through snow", "animals"),
    ("a paper boat drifting down a gutter in the rain", "objects"),
    ("timelapse of clouds over a mountain ridge", "nature"),
    ("a hummingbird hovering at a flower", "animals"),
    ("a tram passing through a city at night", "places"),
    ("steam rising from a cup of tea", "objects"),
    ("a koi fish turning in a pond", "animals"),
    ("northern lights over a frozen lake", "nature"),
    ("a campfire crackling under the stars", "places"),
    ("a spinning top slowing down on a table", "objects"),
    ("a lighthouse beam sweeping through fog", "places"),
]


def demo_video_table() -> pa.Table:
    rows = []
    for i, (prompt, category) in enumerate(PROMPTS):
        rows.append(
            {
                "id": f"video-{i:03d}",
                "prompt": prompt,
                "seed": 2000 + i,
                "width": 96 if i % 3 == 1 else None,
                "height": 64 if i % 3 == 1 else None,
                "num_frames": 17 if i % 4 == 2 else None,
                "fps": 12.0 if i == 5 else None,
                "category": category,
            }
        )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("seed", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("num_frames", pa.int32()),
            ("fps", pa.float64()),
            ("category", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("demo-video.parquet")
    pq.write_table(demo_video_table(), target)
    print(f"wrote {target} ({len(PROMPTS)} rows)")
