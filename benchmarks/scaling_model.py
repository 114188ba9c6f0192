"""A computed scaling model for sequence parallelism (Ulysses, ring) and CFG parallelism.

    python -m benchmarks.scaling_model                 # defaults: MFU calibrated from xDiT's A100 figure
    python -m benchmarks.scaling_model --mfu 0.45      # another utilisation of the datasheet peak
    python -m benchmarks.scaling_model --tflops 420    # a measured bf16 speed of one GPU (see below)
    python -m benchmarks.scaling_model --step-time benchmarks/results/step_time.json

No GPU is needed. For CogView4-6B at 1024x1024 and CogVideoX-5b at 49 x 720x480 it computes, per
denoising step with classifier-free guidance (two transformer passes of batch 1 per step):

- FLOPs per transformer pass, analytically (attention 4*S^2*D, projections 8*S*D^2 and MLP
  4*S*D*F per layer) and counted by torch's FlopCounterMode over a forward pass of the real-size
  transformer built on the `meta` device (no memory, no weights). The counted figure is used when
  the count works; the analytic one otherwise.
- bf16 bytes each rank moves per step for K = 2, 4, 8 GPUs: Ulysses (4 all-to-alls per layer),
  ring attention (one all-gather of K and V per layer, diffusers' `rotate_method="allgather"`),
  CFG parallel x Ulysses (2 halves of K/2), plus the gather of the output tokens.
- seconds per step = compute / (peak x MFU) + bytes / bandwidth + collectives x latency (no
  overlap), or the larger of the two (full overlap), on NVLink and PCIe systems, and the speed-up
  over one GPU, beside xDiT's published CogVideoX-5b figures on A100.

The default MFU is calibrated, not measured: CogVideoX-5b's FLOPs per step over xDiT's 4.07 s per
step on one A100 (312 TFLOP/s bf16 dense). Once `benchmarks/step_time.py` has run on a GPU, pass
its measured speed: `--step-time benchmarks/results/step_time.json` takes each model's achieved
TFLOP/s (tflops_per_step / cogdist_seconds_per_step), or `--tflops T` gives one figure for both
models; either adds a "measured GPU" system whose link is `--link-gbs` (default: H100 NVLink).

Writes benchmarks/results/scaling_model.json and prints the Markdown tables kept in docs/scaling.md
(benchmarks/scaling_report.py renders them).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.scaling_report import markdown

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "tests" / "data" / "checkpoints"
RESULT = ROOT / "benchmarks" / "results" / "scaling_model.json"
STEP_TIME = ROOT / "benchmarks" / "results" / "step_time.json"

BF16 = 2  # bytes per element
DEGREES = (2, 4, 8)
VAE_SCALE = 8  # spatial down-sampling of both VAEs
FF_MULT = 4  # diffusers' FeedForward(mult=4) default, used by all three models (checked on the meta model)

# xDiT's CogVideoX-5b, 49 frames 720x480, seconds per step on A100 (docs/performance/cogvideo.md,
# figure cogvideo-a100-5b.png). Read off the figure; the text of the page does not state them,
# nor the interconnect of that machine, nor which parallel layout gives the 4-GPU figure.
XDIT = {
    "source": "xdit-project/xDiT docs/performance/cogvideo.md, figure cogvideo-a100-5b.png",
    "gpu": "A100",
    "seconds_per_step": {1: 4.07, 4: 1.27},
}
CALIBRATION_PEAK = 312e12  # A100 bf16 dense, FLOP/s


@dataclass(frozen=True)
class System:
    name: str
    peak_tflops: float  # bf16 dense, datasheet (or measured, for the "measured GPU" system)
    link_gbs: float  # achievable per-GPU collective bus bandwidth, GB/s (assumed)
    latency_us: float  # fixed cost per collective, microseconds (assumed)
    mfu: float | None = None  # None: the run's --mfu; a measured system carries its own speed


SYSTEMS = [
    System("A100 SXM, NVLink", 312.0, 250.0, 10.0),
    System("A100, PCIe Gen4", 312.0, 25.0, 20.0),
    System("H100 SXM, NVLink", 989.0, 350.0, 10.0),
    System("H100 PCIe, Gen5", 756.0, 50.0, 20.0),
]


@dataclass
class Workload:
    """One model at one output shape; `text_tokens` holds the text length of each pass of a step."""

    name: str
    folder: str
    layers: int
    heads: int
    head_dim: int
    visual_tokens: int
    text_tokens: list[int]
    out_dim: int  # proj_out width per token (patch^2 x out_channels): what the boundary gather moves
    shape: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def ff_inner(self) -> int:
        return FF_MULT * self.width

    def seq(self, text: int) -> int:
        return self.visual_tokens + text


def load_config(folder: str) -> dict[str, Any]:
    return json.loads((CHECKPOINTS / folder / "transformer" / "config.json").read_text())


def cogview4(text_tokens: int, negative_tokens: int, size: int = 1024) -> Workload:
    cfg = load_config("THUDM__CogView4-6B")
    side = size // VAE_SCALE // cfg["patch_size"]
    return Workload(
        name="CogView4-6B",
        folder="THUDM__CogView4-6B",
        layers=cfg["num_layers"],
        heads=cfg["num_attention_heads"],
        head_dim=cfg["attention_head_dim"],
        visual_tokens=side * side,
        text_tokens=[text_tokens, negative_tokens],
        out_dim=cfg["patch_size"] ** 2 * cfg["out_channels"],
        shape={"width": size, "height": size, "latent": [cfg["in_channels"], size // 8, size // 8]},
        notes=[
            f"{size}x{size}: latent {size // 8}x{size // 8}, patch {cfg['patch_size']} -> {side}x{side} image tokens",
            f"text: {text_tokens} tokens for the prompt (assumed: a typical prompt, GLM tokens padded to "
            f"a multiple of 16 by the pipeline) and {negative_tokens} for the empty negative prompt",
            "the pipeline runs the conditional and unconditional passes as two batch-1 calls",
        ],
    )


def cogvideox5b(frames: int = 49, width: int = 720, height: int = 480) -> Workload:
    cfg = load_config("THUDM__CogVideoX-5b")
    p = cfg["patch_size"]
    latent_frames = (frames - 1) // cfg["temporal_compression_ratio"] + 1
    lh, lw = height // VAE_SCALE, width // VAE_SCALE
    text = cfg["max_text_seq_length"]
    return Workload(
        name="CogVideoX-5b",
        folder="THUDM__CogVideoX-5b",
        layers=cfg["num_layers"],
        heads=cfg["num_attention_heads"],
        head_dim=cfg["attention_head_dim"],
        visual_tokens=latent_frames * (lh // p) * (lw // p),
        text_tokens=[text, text],
        out_dim=p * p * cfg["out_channels"],
        shape={"frames": frames, "width": width, "height": height, "latent": [latent_frames, 16, lh, lw]},
        notes=[
            f"{frames} frames {width}x{height}: {latent_frames} latent frames of {lh}x{lw}, patch {p} -> "
            f"{latent_frames}x{lh // p}x{lw // p} = {latent_frames * (lh // p) * (lw // p)} video tokens",
            f"text: {text} T5 tokens (prompts are padded to max_text_seq_length) for both passes",
            "the stock pipeline runs both CFG passes as one batch-2 call: the same FLOPs and bytes as two "
            "batch-1 passes",
        ],
    )


# -- FLOPs ------------------------------------------------------------------------------------------


def analytic_flops(w: Workload, text: int) -> dict[str, float]:
    """The main terms of one pass (a matmul of m x k by k x n is 2*m*n*k FLOPs)."""
    s, d = w.seq(text), w.width
    per_layer = {
        "attention": 4 * s * s * d,  # QK^T and PV
        "projections": 8 * s * d * d,  # q, k, v, out
        "mlp": 4 * s * d * w.ff_inner,  # up and down
    }
    out = {key: w.layers * value for key, value in per_layer.items()}
    out["total"] = sum(out.values())
    return out


def counted_flops(w: Workload) -> tuple[list[float] | None, dict[str, Any]]:
    """FLOPs of each pass, counted by FlopCounterMode over a meta-device forward of the real-size model."""
    try:
        import diffusers
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError as error:  # the analytic figures stand alone
        return None, {"error": f"not counted: {error}"}
    cfg = load_config(w.folder)
    try:
        with torch.device("meta"):
            model = getattr(diffusers, cfg["_class_name"]).from_config(cfg).eval()
        ff_inner = model.transformer_blocks[0].ff.net[0].proj.out_features
        totals, by_op = [], {}
        for text in w.text_tokens:
            with torch.device("meta"):
                kwargs = model_inputs(w, cfg, text)
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model(**kwargs)
            totals.append(float(counter.get_total_flops()))
            by_op = {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}
    except Exception as error:  # noqa: BLE001 - any failure falls back to the analytic count
        return None, {"error": f"not counted: {type(error).__name__}: {error}"}
    return totals, {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "ff_inner_dim": ff_inner,
        "last_pass_by_op": by_op,
    }


def model_inputs(w: Workload, cfg: dict[str, Any], text: int) -> dict[str, Any]:
    import torch

    if cfg["_class_name"] == "CogView4Transformer2DModel":
        channels, h, wd = w.shape["latent"]
        return {
            "hidden_states": torch.empty(1, channels, h, wd),
            "encoder_hidden_states": torch.empty(1, text, cfg["text_embed_dim"]),
            "timestep": torch.empty(1),
            "original_size": torch.empty(1, 2),
            "target_size": torch.empty(1, 2),
            "crop_coords": torch.empty(1, 2),
        }
    frames, channels, h, wd = w.shape["latent"]
    return {
        "hidden_states": torch.empty(1, frames, channels, h, wd),
        "encoder_hidden_states": torch.empty(1, text, cfg["text_embed_dim"]),
        "timestep": torch.empty(1, dtype=torch.long),
        "image_rotary_emb": (
            torch.empty(w.visual_tokens, w.head_dim),
            torch.empty(w.visual_tokens, w.head_dim),
        ),
    }


# -- communication ----------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What one rank sends or receives in one step, and how many collectives that takes."""

    bytes: float = 0.0
    collectives: int = 0

    def add(self, nbytes: float, count: int = 1) -> None:
        self.bytes += nbytes
        self.collectives += count


def ulysses_pass(w: Workload, text: int, sp: int) -> Traffic:
    """4 all-to-alls per layer (q, k, v in; output back), each rank sending (sp-1)/sp of its S/sp x D."""
    t = Traffic()
    if sp > 1:
        local = w.seq(text) / sp * w.width * BF16
        t.add(w.layers * 4 * (sp - 1) / sp * local, w.layers * 4)
    return t


def ring_pass(w: Workload, text: int, sp: int) -> Traffic:
    """One all-gather of the concatenated K and V per layer: each rank receives (sp-1)/sp of full K and V."""
    t = Traffic()
    if sp > 1:
        t.add(w.layers * (sp - 1) / sp * 2 * w.seq(text) * w.width * BF16, w.layers)
    return t


def boundary_gather(w: Workload, sp: int) -> Traffic:
    """The split before the first block is free (every rank slices its share); the output tokens are
    all-gathered after proj_out, before unpatchifying: (sp-1)/sp of visual_tokens x out_dim."""
    t = Traffic()
    if sp > 1:
        t.add((sp - 1) / sp * w.visual_tokens * w.out_dim * BF16)
    return t


@dataclass
class Plan:
    """One layout of a step over K GPUs: for each group of ranks, the FLOPs and traffic of one rank."""

    strategy: str
    k: int
    sp: int
    cfg: int
    ranks: list[tuple[float, Traffic]]  # (flops per rank, traffic per rank), one entry per CFG half

    @property
    def max_bytes(self) -> float:
        return max(t.bytes for _, t in self.ranks)


def plan(w: Workload, flops: list[float], strategy: str, k: int) -> Plan:
    if strategy in ("ulysses", "ring"):
        move = ulysses_pass if strategy == "ulysses" else ring_pass
        t = Traffic()
        for text in w.text_tokens:
            step = move(w, text, k)
            t.add(step.bytes, step.collectives)
            gather = boundary_gather(w, k)
            t.add(gather.bytes, gather.collectives)
        return Plan(strategy, k, k, 1, [(sum(flops) / k, t)])
    # CFG parallel: half 0 runs the conditional pass, half 1 the unconditional, each with SP of k/2;
    # each half then all-gathers the other half's output (visual_tokens x out_dim) once per step.
    sp = k // 2
    ranks = []
    for text, pass_flops in zip(w.text_tokens, flops):
        t = ulysses_pass(w, text, sp)
        gather = boundary_gather(w, sp)
        t.add(gather.bytes, gather.collectives)
        t.add(w.visual_tokens * w.out_dim * BF16)
        ranks.append((pass_flops / sp, t))
    return Plan("cfg+ulysses", k, sp, 2, ranks)


def step_seconds(p: Plan, system: System, mfu: float) -> dict[str, float]:
    speed = system.peak_tflops * 1e12 * (system.mfu if system.mfu is not None else mfu)
    worst_serial, worst_overlap, worst_comm = 0.0, 0.0, 0.0
    for rank_flops, t in p.ranks:
        compute = rank_flops / speed
        comm = t.bytes / (system.link_gbs * 1e9) + t.collectives * system.latency_us * 1e-6
        worst_serial = max(worst_serial, compute + comm)
        worst_overlap = max(worst_overlap, compute, comm)
        worst_comm = max(worst_comm, comm)
    return {"no_overlap": worst_serial, "full_overlap": worst_overlap, "communication": worst_comm}


# -- divisibility -----------------------------------------------------------------------------------


def divisibility(heads: int | None, splits: dict[str, int], k: int) -> list[str]:
    """Why diffusers needs its uneven ("anything") mode at degree k; empty when it does not.
    `heads` is None for ring attention, which splits no heads."""
    issues = [f"{heads} heads"] if heads is not None and k > 1 and heads % k else []
    return issues + [f"{n} {what}" for what, n in splits.items() if k > 1 and n % k]


def token_splits(w: Workload) -> dict[str, int]:
    """The token counts cogdist's plan splits separately as they enter the first block."""
    kind = "video" if "frames" in w.shape else "image"
    splits = {f"{kind} tokens": w.visual_tokens}
    for i, text in enumerate(dict.fromkeys(w.text_tokens)):
        splits[f"text tokens{' (negative)' if i else ''}"] = text
    return splits


def divisibility_table(workloads: list[Workload]) -> list[dict[str, Any]]:
    """The two workloads, plus CogVideoX-2b at the same shape as the 5b and GLM-Image's decoder at
    1024x1024 (its text/glyph token count varies with the prompt: left out)."""
    cv4, cvx = workloads
    rows = [
        (cv4.name, cv4.folder, token_splits(cv4)),
        (cvx.name, cvx.folder, token_splits(cvx)),
        ("CogVideoX-2b", "THUDM__CogVideoX-2b", token_splits(cvx)),
        ("GLM-Image", "zai-org__GLM-Image", {"image tokens": 4096}),
    ]
    out = []
    for name, folder, splits in rows:
        heads = load_config(folder)["num_attention_heads"]
        entry: dict[str, Any] = {"model": name, "heads": heads, "tokens": splits}
        for k in DEGREES:
            entry[f"ulysses_k{k}"] = divisibility(heads, splits, k)
            entry[f"cfg_ulysses_k{k}"] = divisibility(heads, splits, k // 2)
            entry[f"ring_k{k}"] = divisibility(None, splits, k)
        out.append(entry)
    return out


# -- main -------------------------------------------------------------------------------------------


def measured_speeds(path: Path) -> dict[str, float]:
    """Achieved TFLOP/s per model from benchmarks/step_time.py's results."""
    data = json.loads(path.read_text())
    out = {}
    for row in data.get("results", []):
        if "tiny" in row["model"]:
            continue
        out[row["model"]] = row["tflops_per_step"] / row["cogdist_seconds_per_step"]
    return out


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """The model's result for the command line's settings: what is written to the JSON file."""
    workloads = [cogview4(args.cogview4_text_tokens, args.cogview4_negative_tokens), cogvideox5b()]
    flops: dict[str, list[float]] = {}
    records = []
    for w in workloads:
        analytic = [analytic_flops(w, t) for t in w.text_tokens]
        counted, count_info = (None, {"error": "skipped (--no-count)"}) if args.no_count else counted_flops(w)
        if counted is not None and count_info["ff_inner_dim"] != w.ff_inner:
            raise SystemExit(f"{w.name}: MLP inner dim {count_info['ff_inner_dim']} != {w.ff_inner}")
        flops[w.name] = counted if counted is not None else [a["total"] for a in analytic]
        records.append((w, analytic, counted, count_info))

    calibrated_mfu = sum(flops["CogVideoX-5b"]) / (XDIT["seconds_per_step"][1] * CALIBRATION_PEAK)
    mfu = args.mfu if args.mfu is not None else calibrated_mfu

    systems = list(SYSTEMS)
    measured: dict[str, float] = {}
    if args.step_time is not None:
        measured = measured_speeds(args.step_time)
    elif args.tflops is not None:
        measured = {"cogview4-6b": args.tflops, "cogvideox-5b": args.tflops}
    if measured:
        systems.append(System("measured GPU", 0.0, args.link_gbs, 10.0, mfu=1.0))
    system_names = [s.name for s in systems]

    def system_for(s: System, w: Workload) -> System:
        if s.name != "measured GPU":
            return s
        speed = measured.get(w.name.lower())
        if speed is None:
            raise SystemExit(f"no measured speed for {w.name} in {sorted(measured)}")
        return System(s.name, speed, s.link_gbs, s.latency_us, mfu=1.0)

    out_workloads = []
    for w, analytic, counted, count_info in records:
        total = sum(flops[w.name])
        one_gpu = {
            s.name: step_seconds(Plan("single", 1, 1, 1, [(total, Traffic())]), system_for(s, w), mfu)[
                "no_overlap"
            ]
            for s in systems
        }
        plans = {}
        for strategy in ("ulysses", "ring", "cfg+ulysses"):
            for k in DEGREES:
                p = plan(w, flops[w.name], strategy, k)
                heads = None if strategy == "ring" else w.heads
                seconds = {s.name: step_seconds(p, system_for(s, w), mfu) for s in systems}
                plans[f"{strategy}/{k}"] = {
                    "sp_degree": p.sp,
                    "cfg_degree": p.cfg,
                    "bytes_per_rank": p.max_bytes,
                    "collectives": max(t.collectives for _, t in p.ranks),
                    "flops_per_rank": max(f for f, _ in p.ranks),
                    "needs_uneven_mode": divisibility(heads, token_splits(w), p.sp),
                    "seconds_per_step": seconds,
                    "speedup": {
                        name: {mode: one_gpu[name] / sec[mode] for mode in ("no_overlap", "full_overlap")}
                        for name, sec in seconds.items()
                    },
                }
        out_workloads.append(
            {
                "name": w.name,
                "checkpoint_config": f"tests/data/checkpoints/{w.folder}/transformer/config.json",
                "shape": w.shape,
                "layers": w.layers,
                "heads": w.heads,
                "head_dim": w.head_dim,
                "width": w.width,
                "ff_inner": w.ff_inner,
                "visual_tokens": w.visual_tokens,
                "text_tokens": w.text_tokens,
                "notes": w.notes,
                "analytic_flops_per_pass": analytic,
                "counted_flops_per_pass": counted,
                "count": count_info,
                "flop_source": "counted" if counted is not None else "analytic",
                "flops_per_step": total,
                "attention_share": sum(a["attention"] for a in analytic) / sum(a["total"] for a in analytic),
                "one_gpu_seconds": one_gpu,
                "plans": plans,
            }
        )

    cvx = next(w for w in out_workloads if w["name"] == "CogVideoX-5b")
    a100 = SYSTEMS[0]
    xdit_rows = []
    for s in (SYSTEMS[0], SYSTEMS[1]):
        for strategy in ("ulysses", "ring", "cfg+ulysses"):
            entry = cvx["plans"][f"{strategy}/4"]
            xdit_rows.append(
                {
                    "system": s.name,
                    "strategy": strategy,
                    "seconds": entry["seconds_per_step"][s.name]["no_overlap"],
                    "speedup": entry["speedup"][s.name]["no_overlap"],
                }
            )
    implied = {}
    for strategy in ("ulysses", "ring", "cfg+ulysses"):
        p = plan(
            next(r[0] for r in records if r[0].name == "CogVideoX-5b"), flops["CogVideoX-5b"], strategy, 4
        )
        worst = max(p.ranks, key=lambda r: r[1].bytes)
        compute = worst[0] / (a100.peak_tflops * 1e12 * mfu)
        left = XDIT["seconds_per_step"][4] - compute - worst[1].collectives * a100.latency_us * 1e-6
        implied[strategy] = worst[1].bytes / left / 1e9 if left > 0 else math.inf
    unexplained = {
        strategy: XDIT["seconds_per_step"][4]
        - cvx["plans"][f"{strategy}/4"]["seconds_per_step"][a100.name]["no_overlap"]
        for strategy in ("ulysses", "ring", "cfg+ulysses")
    }

    return {
        "benchmark": "scaling_model",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "assumptions": {
            "dtype": "bf16 (2 bytes) for every activation moved",
            "passes_per_step": "2 (CFG on): conditional and unconditional, batch 1 each",
            "mfu": mfu,
            "mfu_source": "--mfu"
            if args.mfu is not None
            else (
                f"calibrated: CogVideoX-5b FLOPs per step / ({XDIT['seconds_per_step'][1]} s x 312 TFLOP/s), "
                "xDiT's single-A100 figure; not a measurement of ours"
            ),
            "calibrated_mfu": calibrated_mfu,
            "measured_tflops": measured or None,
            "systems": [s.__dict__ for s in systems],
            "bandwidth": "achievable per-GPU bus bandwidth of NCCL all-to-all / all-gather (nccl-tests busbw "
            "convention: time = bytes a rank sends or receives / busbw); assumed, not measured",
            "overlap": "no_overlap = compute + communication (diffusers' Ulysses and allgather-ring wait on "
            "their collectives before attending); full_overlap = max(compute, communication), a bound",
            "compute_scaling": "each rank does 1/SP of every matmul and of attention at the same MFU as one GPU "
            "(smaller matmuls at high K usually run at a lower MFU: optimistic there)",
            "negligible": "AdaLN/timestep/patch-embedding matmuls (<1% of FLOPs, included in the counted "
            "figure), norms, RoPE, softmax, scheduler step; the split before the first block is a local slice",
        },
        "xdit_comparison": {
            "source": XDIT["source"],
            "published": XDIT["seconds_per_step"],
            "published_speedup": XDIT["seconds_per_step"][1] / XDIT["seconds_per_step"][4],
            "model": xdit_rows,
            "implied_link_gbs": implied,
            "unexplained_seconds_nvlink": unexplained,
        },
        "divisibility": divisibility_table(workloads),
        "system_names": system_names,
        "workloads": out_workloads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="fraction of the datasheet peak reached "
        "(default: calibrated on xDiT's 4.07 s/step for CogVideoX-5b on one A100)",
    )
    parser.add_argument(
        "--tflops",
        type=float,
        default=None,
        help="measured bf16 TFLOP/s one GPU achieves "
        "on these models (FLOPs per step / seconds per step, from benchmarks/step_time.py)",
    )
    parser.add_argument(
        "--step-time",
        type=Path,
        default=None,
        help=f"read per-model achieved TFLOP/s from "
        f"benchmarks/step_time.py's results (e.g. {STEP_TIME.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--link-gbs",
        type=float,
        default=350.0,
        help="per-GPU link bandwidth of the measured "
        "GPU's system, GB/s (default: H100 SXM NVLink assumption)",
    )
    parser.add_argument("--cogview4-text-tokens", type=int, default=128)
    parser.add_argument("--cogview4-negative-tokens", type=int, default=16)
    parser.add_argument(
        "--no-count", action="store_true", help="analytic FLOPs only (skip the meta-device count)"
    )
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    result = predict(args)
    text = markdown(result)
    result["markdown"] = text
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(text)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
