"""Eq. 13 scores for a whole chain: patchslim's ops against plain torch.

For block t, the exact scores need the maps of blocks t..L. The baseline is the
best plain-torch composition of DESIGN.md §4 we could write: every step forms the
full (N, N) second moment with one head-summed bmm, then the diagonal, then
``Σ_h ‖P_h |Z|‖²`` by matmul. Ours is ``patchslim_ext.scoring.per_image_scores``
(factored deep steps, only the block the next step reads, a diagonal-only last
step, fused reductions). Both run in float32 on the same random maps.

GFLOP/s counts the baseline's arithmetic for both, so it compares like with like.

    python bench/bench_scoring.py [--device cpu|cuda] [--batch 64] [--min-run-time 2]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, save

from patchslim_ext.benchmark import describe_machine, markdown_table
from patchslim_ext.scoring import per_image_scores

TOKENS = 197
# Keep ratios of blocks 1..12: every token in the first three blocks, then a
# pyramid down to the class token (the shape of the paper's Fig. 5).
KEEP_RATIOS = [1.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.0]
MODELS = {"DeiT-S": (6, 384), "DeiT-B": (12, 768)}


def keep_counts() -> list[int]:
    return [max(1, round(ratio * TOKENS)) for ratio in KEEP_RATIOS]


def baseline_scores(attn: list[torch.Tensor], z_in: torch.Tensor) -> torch.Tensor:
    top = attn[-1]
    batch, kept = top.shape[0], top.shape[2]
    S = torch.eye(kept, device=top.device, dtype=top.dtype).expand(batch, kept, kept)
    for maps in reversed(attn[1:]):
        heads, kept = maps.shape[1], maps.shape[2]
        T = S[:, None, :kept, :kept] @ maps
        stacked = maps.reshape(batch, heads * kept, -1)
        S = stacked.mT @ T.reshape(batch, heads * kept, -1)
    diagonal = S.diagonal(dim1=1, dim2=2)
    return diagonal * (attn[0] @ z_in.abs().unsqueeze(1)).square().sum((1, 3))


def baseline_flops(attn: list[torch.Tensor], channels: int) -> int:
    batch, heads, tokens, _ = attn[0].shape
    chain = sum(heads * (m.shape[2] ** 2 * tokens + m.shape[2] * tokens**2) for m in attn[1:])
    return 2 * batch * (chain + heads * tokens * tokens * channels)


def random_maps(batch, heads, kept, tokens, device, generator):
    logits = torch.randn(batch, heads, kept, tokens, generator=generator, device=device)
    return torch.softmax(logits * 3, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=[1, 5, 9],
        help="blocks t to score (1-indexed); t=1 is the whole 12-block chain",
    )
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    counts = keep_counts()
    records, rows = [], []
    with torch.no_grad():
        for model, (heads, channels) in MODELS.items():
            for block in args.blocks:
                above = counts[block:]  # n_{t+1} .. n_L
                attn = [random_maps(args.batch, heads, TOKENS, TOKENS, device, generator)]
                attn += [
                    random_maps(args.batch, heads, n, TOKENS, device, generator) for n in above
                ]
                z_in = torch.randn(args.batch, TOKENS, channels, generator=generator, device=device)

                ours = per_image_scores(attn, z_in, above)
                reference = baseline_scores(attn, z_in)
                error = ((ours - reference).abs().max() / reference.abs().max()).item()
                t_base = median_seconds(partial(baseline_scores, attn, z_in), args.min_run_time)
                t_ours = median_seconds(
                    partial(per_image_scores, attn, z_in, above), args.min_run_time
                )
                flops = baseline_flops(attn, channels)
                record = {
                    "model": model,
                    "heads": heads,
                    "channels": channels,
                    "tokens": TOKENS,
                    "batch": args.batch,
                    "block": block,
                    "chain_blocks": len(above) + 1,
                    "keep_counts_above": above,
                    "device": args.device,
                    "dtype": "float32",
                    "baseline_ms": t_base * 1e3,
                    "ours_ms": t_ours * 1e3,
                    "baseline_gflops_per_s": flops / t_base / 1e9,
                    "ours_gflops_per_s": flops / t_ours / 1e9,
                    "speedup": t_base / t_ours,
                    "max_relative_difference": error,
                }
                records.append(record)
                rows.append(
                    [
                        model,
                        f"t={block} ({len(above) + 1} maps)",
                        f"{t_base * 1e3:.1f}",
                        f"{t_ours * 1e3:.1f}",
                        f"{record['baseline_gflops_per_s']:.1f}",
                        f"{record['ours_gflops_per_s']:.1f}",
                        f"{record['speedup']:.2f}x",
                        f"{error:.1e}",
                    ]
                )
                print(
                    markdown_table(["model", "block"], [rows[-1][:2]]).splitlines()[-1],
                    f"{rows[-1][6]}",
                    flush=True,
                )

    headers = [
        "model",
        "block",
        "torch ms",
        "patchslim ms",
        "torch GFLOP/s",
        "patchslim GFLOP/s",
        "speedup",
        "max rel. diff",
    ]
    table = markdown_table(headers, rows)
    header = (
        f"Eq. 13 scores, batch {args.batch}, N={TOKENS}, float32, keep counts "
        f"{counts}, on {describe_machine(args.device)}"
    )
    path = save(f"scoring_{args.device}", records, table, header)
    print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
