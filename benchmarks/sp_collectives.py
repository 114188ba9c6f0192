"""What sequence parallelism costs on a CPU: seconds per transformer pass at K = 1 and K = 2, and
the bytes each rank receives through collectives per pass, on the tiny presets over gloo.

    python -m benchmarks.sp_collectives [--passes 8]

Each rank is a spawned process with one torch thread (the machine has 2 cores, so K = 2 uses both
and K = 1 one). A one-row render's first transformer call is captured (as the sequence-parallel tests do) and replayed: the same
inputs at K = 1 and K = 2, in the uneven mode cogdist uses (and the even mode where the tokens
divide). Bytes are counted by wrapping the collectives diffusers and cogdist call
(`dist.all_gather`, `funcol.all_to_all_single`, `funcol.all_gather_tensor`): what this rank
receives from its peers. Tiny models make this a measure of overhead, not of speed-up: their
passes take milliseconds, so the fixed cost of each collective dominates. Results go to
benchmarks/results/sp_collectives.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

from benchmarks.common import machine, save
from cogdist.parallel.group import Layout
from tests.distributed import run_gang
from tests.test_sequence_parallel import first_transformer_call

# preset -> (side, frames): sizes large enough for a few hundred tokens.
ROWS = {
    "tiny-cogview4": (256, None),
    "tiny-cogvideox": (128, 17),
    "tiny-glm-image": (256, None),
}
PROMPT = "a lighthouse at dusk, waves"


@contextmanager
def counting(received: list[int]):
    """Count the bytes this rank receives through the collectives sequence parallelism uses."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    originals = (dist.all_gather, funcol.all_to_all_single, funcol.all_gather_tensor)

    def all_gather(outputs, tensor, group=None, **kw):
        received.append(
            sum(o.numel() * o.element_size() for o in outputs) - tensor.numel() * tensor.element_size()
        )
        return originals[0](outputs, tensor, group=group, **kw)

    def all_to_all_single(tensor, output_split_sizes, input_split_sizes, group, **kw):
        size = dist.get_world_size(group)
        rows = output_split_sizes or [tensor.shape[0] // size] * size
        per_row = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
        received.append((sum(rows) - rows[dist.get_rank(group)]) * per_row)
        return originals[1](tensor, output_split_sizes, input_split_sizes, group, **kw)

    def all_gather_tensor(tensor, gather_dim, group, **kw):
        size = dist.get_world_size(group)
        received.append(tensor.numel() * tensor.element_size() * (size - 1))
        return originals[2](tensor, gather_dim, group, **kw)

    dist.all_gather, funcol.all_to_all_single, funcol.all_gather_tensor = (
        all_gather,
        all_to_all_single,
        all_gather_tensor,
    )
    try:
        yield
    finally:
        dist.all_gather, funcol.all_to_all_single, funcol.all_gather_tensor = originals


def measure(gang, passes: int, modes: list[tuple[str, bool]]) -> dict:
    import torch
    import torch.distributed as dist

    from cogdist.parallel.sequence import apply_sequence_parallel

    results = {}
    for preset, uneven in modes:
        size, frames = ROWS[preset]
        transformer, _, kwargs = first_transformer_call(preset, size, frames, PROMPT)
        apply_sequence_parallel(transformer, gang, uneven=uneven)
        times, received = [], []
        with torch.no_grad():
            for number in range(passes + 2):  # two warm-up passes
                if gang.world_size > 1:
                    dist.barrier()
                start = time.perf_counter()
                if number == 2:
                    with counting(received):
                        transformer(**kwargs)
                else:
                    transformer(**kwargs)
                if number >= 2:
                    times.append(time.perf_counter() - start)
        tokens = kwargs["hidden_states"].shape
        results[f"{preset} {'uneven' if uneven else 'even'}"] = {
            "seconds_per_pass": statistics.median(times),
            "bytes_received_per_pass": sum(received),
            "collectives_per_pass": len(received),
            "latent_shape": list(tokens),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=8)
    args = parser.parse_args()
    modes_k2 = [(preset, True) for preset in ROWS] + [("tiny-cogview4", False), ("tiny-cogvideox", False)]
    one = run_gang(Layout(sp=1), measure, args.passes, [(preset, True) for preset in ROWS])[0]
    two = run_gang(Layout(sp=2), measure, args.passes, modes_k2)
    table = []
    for name in two[0]:
        preset = name.split()[0]
        single = one[f"{preset} uneven"]["seconds_per_pass"]
        ranks = [two[rank][name] for rank in sorted(two)]
        seconds = max(r["seconds_per_pass"] for r in ranks)
        table.append(
            {
                "case": name,
                "k1_ms": round(single * 1e3, 2),
                "k2_ms": round(seconds * 1e3, 2),
                "speedup": round(single / seconds, 2),
                "collectives_per_pass": ranks[0]["collectives_per_pass"],
                "kib_received_per_rank_per_pass": [
                    round(r["bytes_received_per_pass"] / 1024, 1) for r in ranks
                ],
                "latent_shape": ranks[0]["latent_shape"],
            }
        )
    print("| case | K=1 ms/pass | K=2 ms/pass | speed-up | collectives/pass | KiB received per rank/pass |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['case']} | {row['k1_ms']} | {row['k2_ms']} | {row['speedup']}x | "
            f"{row['collectives_per_pass']} | {' / '.join(map(str, row['kib_received_per_rank_per_pass']))} |"
        )
    path = save(
        "sp_collectives", {"machine": machine(), "passes": args.passes, "rows": ROWS, "results": table}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
