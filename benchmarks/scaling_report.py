"""The Markdown tables of the scaling model (benchmarks/scaling_model.py), rendered from its result.

`python -m benchmarks.scaling_model` computes the model and prints these tables (docs/scaling.md
keeps them). The report reads only the result's dict, as the model builds it.
"""

from __future__ import annotations

from typing import Any

LABELS = {"ulysses": "Ulysses", "ring": "ring (allgather)", "cfg+ulysses": "CFG-parallel x Ulysses"}


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/scaling.md: FLOPs, bytes moved, predicted speed-ups, xDiT, divisibility."""
    lines: list[str] = []
    add = lines.append
    degrees = sorted({int(key.split("/")[1]) for key in result["workloads"][0]["plans"]})
    add("### FLOPs per denoising step (CFG: two transformer passes, batch 1 each)\n")
    add(
        "| model | layers | heads x dim = D | MLP inner | tokens per pass (visual + text) "
        "| TFLOP per pass, analytic | TFLOP per pass, counted | TFLOP per step |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for w in result["workloads"]:
        tokens = " / ".join(f"{w['visual_tokens']} + {t}" for t in w["text_tokens"])
        analytic = " / ".join(fmt_flops(a["total"]) for a in w["analytic_flops_per_pass"])
        counted = w["counted_flops_per_pass"]
        counted_s = " / ".join(fmt_flops(c) for c in counted) if counted else "n/a"
        add(
            f"| {w['name']} | {w['layers']} | {w['heads']} x {w['head_dim']} = {w['width']} | {w['ff_inner']} "
            f"| {tokens} | {analytic} | {counted_s} | **{fmt_flops(w['flops_per_step'])}** ({w['flop_source']}) |"
        )
    add("")
    ratios = [
        f"{w['name']} {sum(w['counted_flops_per_pass']) / sum(a['total'] for a in w['analytic_flops_per_pass']):.4f}"
        for w in result["workloads"]
        if w["counted_flops_per_pass"]
    ]
    if ratios:
        add(
            "Counted / analytic: "
            + ", ".join(ratios)
            + " (the analytic terms leave out the embeddings, AdaLN and output projections)."
        )
    add(
        "Attention share of the analytic total: "
        + ", ".join(f"{w['name']} {w['attention_share']:.0%}" for w in result["workloads"])
        + ".\n"
    )

    add("### bf16 bytes moved per rank per step\n")
    header = (
        "| layout | K | " + " | ".join(f"{w['name']} GB (collectives)" for w in result["workloads"]) + " |"
    )
    add(header)
    add("|---|---|" + "---|" * len(result["workloads"]))
    for strategy in ("ulysses", "ring", "cfg+ulysses"):
        for k in degrees:
            cells = []
            for w in result["workloads"]:
                entry = w["plans"][f"{strategy}/{k}"]
                cells.append(f"{entry['bytes_per_rank'] / 1e9:.2f} ({entry['collectives']})")
            add(f"| {LABELS[strategy]} | {k} | " + " | ".join(cells) + " |")
    add("")

    mfu = result["assumptions"]["mfu"]
    measured = " (the measured GPU at its measured speed)" if result["assumptions"]["measured_tflops"] else ""
    add(f"### Predicted speed-up over one GPU (MFU {mfu:.3f}{measured}; no overlap / full overlap)\n")
    for w in result["workloads"]:
        add(
            f"**{w['name']}** (one GPU: "
            + ", ".join(f"{s}: {w['one_gpu_seconds'][s]:.2f} s/step" for s in result["system_names"])
            + ")\n"
        )
        add("| layout | K | " + " | ".join(result["system_names"]) + " |")
        add("|---|---|" + "---|" * len(result["system_names"]))
        for strategy in ("ulysses", "ring", "cfg+ulysses"):
            for k in degrees:
                entry = w["plans"][f"{strategy}/{k}"]
                mark = " ᵘ" if entry["needs_uneven_mode"] else ""
                cells = [
                    f"{entry['speedup'][s]['no_overlap']:.2f}x / {entry['speedup'][s]['full_overlap']:.2f}x{mark}"
                    for s in result["system_names"]
                ]
                add(f"| {LABELS[strategy]} | {k} | " + " | ".join(cells) + " |")
        add("")
    add(
        "ᵘ: the token (or head) counts do not divide by the degree; diffusers needs its uneven mode "
        "(`ulysses_anything` / `ring_anything`) there. See the divisibility table.\n"
    )

    x = result["xdit_comparison"]
    add("### Against xDiT's CogVideoX-5b on A100 (49 x 720x480)\n")
    add("| | seconds per step | speed-up |")
    add("|---|---|---|")
    add(f"| xDiT, 1 GPU (published; calibrates the MFU) | {x['published'][1]:.2f} | 1.00x |")
    add(
        f"| xDiT, 4 GPUs (published, layout not stated) | {x['published'][4]:.2f} | {x['published_speedup']:.2f}x |"
    )
    for row in x["model"]:
        add(
            f"| model, {row['system']}, {LABELS[row['strategy']]} K=4 | {row['seconds']:.2f} "
            f"| {row['speedup']:.2f}x |"
        )
    add("")
    add(
        "Effective bandwidth at which the model's no-overlap K=4 time equals xDiT's 1.27 s: "
        + ", ".join(f"{LABELS[s]} {v:.0f} GB/s" for s, v in x["implied_link_gbs"].items())
        + ". On the NVLink system the model leaves "
        + ", ".join(f"{v:.2f} s ({LABELS[s]})" for s, v in x["unexplained_seconds_nvlink"].items())
        + " of xDiT's 4-GPU step unexplained.\n"
    )

    add("### Divisibility (cogdist splits text and visual tokens separately)\n")
    add("| model | heads | tokens split | Ulysses K=2 | K=4 | K=8 | CFG x Ulysses K=4 (SP 2) | K=8 (SP 4) |")
    add("|---|---|---|---|---|---|---|---|")
    for row in result["divisibility"]:
        tokens = ", ".join(f"{n} {what}" for what, n in row["tokens"].items())
        cells = [row[f"ulysses_k{k}"] for k in degrees] + [row["cfg_ulysses_k4"], row["cfg_ulysses_k8"]]
        add(
            f"| {row['model']} | {row['heads']} | {tokens} | "
            + " | ".join("even" if not c else "uneven: " + ", ".join(c) for c in cells)
            + " |"
        )
    add("")
    return "\n".join(lines)
