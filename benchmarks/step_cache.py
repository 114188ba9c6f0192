"""Step caching (--cache) on the CPU: seconds per item, work skipped and pixel difference.

    python -m benchmarks.step_cache [--steps 50] [--rounds 3] [--threads 1] [--only cogview4]

For each family and each cache kind it supports (its FamilySpec's `step_caches`), one row is rendered in
process by the family's `render` (what the worker calls) on the pipeline a worker builds, with the tiny random-weight preset at a
size and step count where the transformer is most of the time: CogView4 at 256x256, CogVideoX at
128x128 x 17 frames, 50 steps. Rounds are interleaved (every case once per round) and medians
compared, as the machine is shared and noisy. Counted per render: transformer block computations
(a block's first norm runs only when the block computes) and attention computations (its q
projection), and the seconds spent inside the transformer. The pixel difference is against the
uncached render of the same row: mean |difference| on 0-255 and PSNR; a render of the same row
with another seed is given for scale. Results go to benchmarks/results/step_cache.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, save, set_up_worker
from cogdist.inputs import Inputs
from cogdist.models.registry import family as family_spec
from cogdist.work import WorkItem
from cogdist.worker.cache import FIRST_BLOCK_THRESHOLD, apply_step_cache, remove_step_cache

# family -> first-block thresholds measured: the default, and one at which the tiny models skip.
THRESHOLDS = {"cogview4": (FIRST_BLOCK_THRESHOLD, 0.3), "cogvideox": (FIRST_BLOCK_THRESHOLD, 0.5)}


class Bench:
    """One family's tiny pipeline, its row, and counters of the transformer's real work."""

    def __init__(self, family: str, steps: int):
        self.family = family
        worker = set_up_worker(f"tiny-{family}")
        self.pipe, self.device, self.runner = worker.pipe, worker.device, worker.runner
        if family == "cogview4":
            self.row = WorkItem("a", "a small house by a lake", None, 0, 256, 256, steps, 5.0, None, "a.png")
        else:
            self.row = WorkItem(
                "a",
                "a small house by a lake",
                None,
                0,
                128,
                128,
                steps,
                6.0,
                17,
                "a.mp4",
                task="text-to-video",
            )
        self.blocks = self.attentions = 0
        self.transformer_seconds = 0.0
        self._entered = 0.0
        transformer = self.pipe.transformer
        for block in transformer.transformer_blocks:
            block.norm1.register_forward_pre_hook(lambda *_: self._add("blocks"))
            block.attn1.to_q.register_forward_pre_hook(lambda *_: self._add("attentions"))
        transformer.register_forward_pre_hook(lambda *_: self._enter())
        transformer.register_forward_hook(lambda *_: self._leave())

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def _enter(self) -> None:
        self._entered = time.perf_counter()

    def _leave(self) -> None:
        self.transformer_seconds += time.perf_counter() - self._entered

    def render(self, seed: int = 0) -> tuple[np.ndarray, dict]:
        self.blocks = self.attentions = 0
        self.transformer_seconds = 0.0
        row = type(self.row)(**{**vars(self.row), "seed": seed})
        start = time.perf_counter()
        pixels = self.runner.render(self.pipe, [row], self.device, [Inputs()])[0]
        return pixels, {
            "seconds": time.perf_counter() - start,
            "transformer_seconds": self.transformer_seconds,
            "blocks": self.blocks,
            "attentions": self.attentions,
        }


def cases(family: str) -> list[tuple[str, str, float | None]]:
    """(label, kind, threshold) of every cache the family supports (its FamilySpec's step_caches), the uncached render first."""
    found = [("none", "none", None)]
    for kind in family_spec(family).step_caches:
        if kind == "first-block":
            found += [(f"first-block {t:g}", kind, t) for t in THRESHOLDS[family]]
        else:
            found.append((kind, kind, None))
    return found


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean |a - b| on 0-255, and PSNR in dB (inf when equal)."""
    delta = a.astype(np.float64) - b.astype(np.float64)
    mse = float((delta**2).mean())
    return float(np.abs(delta).mean()), (math.inf if mse == 0 else 10 * math.log10(255**2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--only", nargs="*", choices=list(THRESHOLDS), help="families (default: both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for family in args.only or list(THRESHOLDS):
        bench = Bench(family, args.steps)
        bench.render()  # warm-up
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in cases(family)}
        pixels: dict[str, np.ndarray] = {}
        for round_ in range(args.rounds):
            for label, kind, threshold in cases(family):
                apply_step_cache(bench.pipe, kind, threshold)
                try:
                    pixels[label], run = bench.render()
                finally:
                    remove_step_cache(bench.pipe)
                runs[label].append(run)
                print(f"{family} round {round_} {label}: {run}", flush=True)
        other_seed, _ = bench.render(seed=1)
        scale_mad, scale_psnr = difference(other_seed, pixels["none"])
        base = runs["none"]
        base_seconds = statistics.median(r["seconds"] for r in base)
        base_transformer = statistics.median(r["transformer_seconds"] for r in base)
        for label, kind, threshold in cases(family):
            seconds = statistics.median(r["seconds"] for r in runs[label])
            transformer_seconds = statistics.median(r["transformer_seconds"] for r in runs[label])
            mad, psnr = difference(pixels[label], pixels["none"])
            results.append(
                {
                    "family": family,
                    "cache": label,
                    "kind": kind,
                    "threshold": threshold,
                    "size": [bench.row.width, bench.row.height],
                    "frames": bench.row.num_frames,
                    "steps": args.steps,
                    "seconds_per_item": [round(r["seconds"], 3) for r in runs[label]],
                    "median_seconds": round(seconds, 3),
                    "median_transformer_seconds": round(transformer_seconds, 3),
                    "speedup": round(base_seconds / seconds, 3),
                    "transformer_speedup": round(base_transformer / transformer_seconds, 3),
                    "block_computations": runs[label][0]["blocks"],
                    "blocks_skipped": round(1 - runs[label][0]["blocks"] / base[0]["blocks"], 3),
                    "attention_computations": runs[label][0]["attentions"],
                    "attentions_skipped": round(1 - runs[label][0]["attentions"] / base[0]["attentions"], 3),
                    "mean_abs_diff": round(mad, 3),
                    "psnr_db": None if math.isinf(psnr) else round(psnr, 2),
                    "other_seed_mean_abs_diff": round(scale_mad, 2),
                    "other_seed_psnr_db": round(scale_psnr, 2),
                }
            )
            print(
                f"{family} {label}: {seconds:.3f}s/item x{results[-1]['speedup']} "
                f"blocks skipped {results[-1]['blocks_skipped']:.0%} "
                f"attention skipped {results[-1]['attentions_skipped']:.0%} "
                f"MAD {mad:.2f} PSNR {psnr:.1f} dB",
                flush=True,
            )
    if args.only:  # keep the other families' last figures
        previous = RESULTS / "step_cache.json"
        if previous.exists():
            kept = [r for r in json.loads(previous.read_text())["results"] if r["family"] not in args.only]
            results = kept + results
    path = save(
        "step_cache",
        {"rounds": args.rounds, "steps": args.steps, "threads": args.threads, "results": results},
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
