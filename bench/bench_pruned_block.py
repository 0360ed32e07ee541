"""Pruned blocks: patchslim's ops against plain torch (whole models: bench_models.py).

Per block (N=197, DeiT-Ti/S/B widths), updating the first n of N tokens:
  ours       patchslim.pruned_msa + pruned_mlp (fused LN, softmax, bias+GELU, residual)
  (a) prefix the same prefix maths from torch ops: slices, F.linear, SDPA
  (b) gather the gather -> SDPA -> scatter formulation of token-pruning code
  (c) dense  the unpruned block
Forward under no_grad, and forward+backward (ours and (a)).

    python bench/bench_pruned_block.py [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, save

import patchslim_ext as ps
from patchslim_ext.benchmark import (
    describe_machine,
    markdown_table,
    split_heads,
    torch_pruned_block_rows,
)
from patchslim_ext.pruned import _mlp_args, _msa_args
from patchslim_ext.vit import Block

MODELS = {"DeiT-Ti": (192, 3), "DeiT-S": (384, 6), "DeiT-B": (768, 12)}
TOKENS = 197


def torch_prefix(block: Block, x, n):
    """(a): kept rows of the pruned block from torch ops."""
    return torch_pruned_block_rows(block, x, n)


def torch_gather(block: Block, x, index):
    """(b): gather the kept tokens, attend to all, scatter them back."""
    attn, heads = block.attn, block.attn.num_heads
    channels = x.shape[-1]
    gathered = x.index_select(1, index)
    h = block.norm1(x)
    q = F.linear(h.index_select(1, index), attn.qkv.weight[:channels], attn.qkv.bias[:channels])
    k, v = F.linear(h, attn.qkv.weight[channels:], attn.qkv.bias[channels:]).chunk(2, -1)
    o = F.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    )
    kept = gathered + attn.proj(o.transpose(1, 2).flatten(2))
    kept = kept + block.mlp(block.norm2(kept))
    return x.index_copy(1, index, kept)


def ours(block: Block, x, n):
    kept, _ = ps.ops.pruned_msa(x, n, block.attn.num_heads, *_msa_args(block))
    return ps.ops.pruned_mlp(kept, *_mlp_args(block))


def backward(fn, block, x, arg):
    out = fn(block, x, arg)
    torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))


def block_rows(args, device, dtype):
    rows, records = [], []
    gen = torch.Generator().manual_seed(0)
    for model, (channels, heads) in MODELS.items():
        block = Block(channels, heads, 4 * channels).to(device, dtype)
        x = torch.randn(args.batch, TOKENS, channels, generator=gen).to(device, dtype)
        for ratio in args.ratios:
            n = max(1, round(ratio * TOKENS))
            index = torch.randperm(TOKENS, generator=gen)[:n].sort().values.to(device)
            with torch.no_grad():
                times = {
                    "ours": median_seconds(partial(ours, block, x, n), args.min_run_time),
                    "prefix": median_seconds(partial(torch_prefix, block, x, n), args.min_run_time),
                    "gather": median_seconds(
                        partial(torch_gather, block, x, index), args.min_run_time
                    ),
                    "dense": median_seconds(partial(block, x), args.min_run_time),
                }
            xg = x.detach().requires_grad_()
            times["ours_bwd"] = median_seconds(
                partial(backward, ours, block, xg, n), args.min_run_time
            )
            times["prefix_bwd"] = median_seconds(
                partial(backward, torch_prefix, block, xg, n), args.min_run_time
            )
            record = {
                "model": model,
                "batch": args.batch,
                "n_keep": n,
                "keep_ratio": n / TOKENS,
                **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            }
            records.append(record)
            rows.append(
                [
                    model,
                    f"{n} ({100 * n / TOKENS:.0f}%)",
                    *(f"{times[k] * 1e3:.2f}" for k in ("ours", "prefix", "gather", "dense")),
                    f"{times['prefix'] / times['ours']:.2f}x",
                    f"{times['ours_bwd'] * 1e3:.1f}",
                    f"{times['prefix_bwd'] * 1e3:.1f}",
                    f"{times['prefix_bwd'] / times['ours_bwd']:.2f}x",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    headers = [
        "model",
        "n kept",
        "ours ms",
        "(a) prefix ms",
        "(b) gather ms",
        "(c) dense ms",
        "fwd speedup vs (a)",
        "ours fwd+bwd ms",
        "(a) fwd+bwd ms",
        "fwd+bwd speedup",
    ]
    return records, markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument(
        "--batch", type=int, default=None, help="per-block batch (16 CPU, 256 CUDA)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.batch = args.batch or (256 if cuda else 16)

    records, table = block_rows(args, args.device, dtype)
    where = f"{args.device} {dtype}, on {describe_machine(args.device)}"
    header = f"Pruned blocks (batch {args.batch}, N={TOKENS}), {where}; random weights"
    path = save(f"pruned_block_{args.device}", records, table, header)
    print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
