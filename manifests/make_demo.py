"""Write manifests/demo.parquet: 24 rows for `tiny-cogview4` with varied prompts, sizes and seeds.

    python manifests/make_demo.py [OUT.parquet]

Columns: id, prompt, negative_prompt (some rows), seed (some rows; the others get one derived
from their id), width/height (some rows; the others take the model default), num_inference_steps
(some rows), and `category`, an extra column that cogdist carries into the index unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUBJECTS = [
    ("a red fox sleeping in fresh snow", "animals"),
    ("a lighthouse on a cliff at dusk, oil painting", "places"),
    ("macro photo of a dew drop on a leaf", "nature"),
    ("an astronaut riding a horse on mars", "fantasy"),
    ("a bowl of ramen with a soft egg, top view", "food"),
    ("a cyberpunk street market in the rain", "places"),
    ("a paper crane on a wooden desk", "objects"),
    ("a snowy mountain range under the aurora", "nature"),
    ("an owl wearing tiny reading glasses", "animals"),
    ("a vintage red bicycle against a yellow wall", "objects"),
    ("a watercolor map of an imaginary island", "fantasy"),
    ("fresh croissants on a marble counter", "food"),
    ("a koi pond seen from above", "nature"),
    ("a robot tending a rooftop garden", "fantasy"),
    ("a tram crossing a bridge in lisbon", "places"),
    ("a chess board mid-game, shallow depth of field", "objects"),
    ("a hummingbird drinking from a red flower", "animals"),
    ("a stack of pancakes with blueberries", "food"),
    ("ancient ruins covered in moss", "places"),
    ("a glass terrarium with a tiny forest", "nature"),
    ("a dragon made of origami", "fantasy"),
    ("a cat napping in a sunbeam", "animals"),
    ("an espresso cup with latte art", "food"),
    ("a neon sign that says open", "objects"),
]
SIZES = [(64, 64), (96, 64), (64, 96), (128, 128)]


def demo_table() -> pa.Table:
    rows = []
    for i, (prompt, category) in enumerate(SUBJECTS):
        size = SIZES[i % len(SIZES)] if i % 3 else (None, None)
        rows.append(
            {
                "id": f"demo-{i:03d}",
                "prompt": prompt,
                "negative_prompt": "blurry, low quality" if i % 4 == 0 else None,
                "seed": 1000 + i if i % 2 == 0 else None,
                "width": size[0],
                "height": size[1],
                "num_inference_steps": 6 if i % 5 == 0 else None,
                "category": category,
            }
        )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("negative_prompt", pa.string()),
            ("seed", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("num_inference_steps", pa.int32()),
            ("category", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("demo.parquet")
    pq.write_table(demo_table(), target)
    print(f"wrote {target} ({len(SUBJECTS)} rows)")
