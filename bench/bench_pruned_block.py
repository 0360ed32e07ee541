"""Pruned blocks and slimmed models: patchslim's ops against plain torch.

Per block (N=197, DeiT-Ti/S/B widths), updating the first n of N tokens:
  ours       patchslim.pruned_msa + pruned_mlp (fused LN, softmax, bias+GELU, residual)
  (a) prefix the same prefix maths from torch ops: slices, F.linear, SDPA
  (b) gather the gather -> SDPA -> scatter formulation of token-pruning code
  (c) dense  the unpruned block
Forward under no_grad, and forward+backward (ours and (a)). End to end: the dense
model, PrunedViT (in-place prefix updates) and (a) applied to every block, with a
pyramid plan; the measured time reduction against the FLOP reduction.

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
from common import machine, markdown_table, median_seconds, save

import patchslim_ext as ps
from patchslim_ext.pruned import _mlp_args, _msa_args
from patchslim_ext.vit import Block

MODELS = {"DeiT-Ti": (192, 3), "DeiT-S": (384, 6), "DeiT-B": (768, 12)}
TOKENS = 197
# Keep ratios of blocks 1..12 for the end-to-end plans: a pyramid.
PYRAMID = [1.0, 1.0, 1.0, 0.75, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.0]


def _split(t, heads):
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def torch_prefix(block: Block, x, n):
    """(a): kept rows of the pruned block from torch ops."""
    attn, heads = block.attn, block.attn.num_heads
    channels = x.shape[-1]
    h = block.norm1(x)
    q = F.linear(h[:, :n], attn.qkv.weight[:channels], attn.qkv.bias[:channels])
    k, v = F.linear(h, attn.qkv.weight[channels:], attn.qkv.bias[channels:]).chunk(2, -1)
    o = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    kept = x[:, :n] + attn.proj(o.transpose(1, 2).flatten(2))
    return kept + block.mlp(block.norm2(kept))


def torch_gather(block: Block, x, index):
    """(b): gather the kept tokens, attend to all, scatter them back."""
    attn, heads = block.attn, block.attn.num_heads
    channels = x.shape[-1]
    gathered = x.index_select(1, index)
    h = block.norm1(x)
    q = F.linear(h.index_select(1, index), attn.qkv.weight[:channels], attn.qkv.bias[:channels])
    k, v = F.linear(h, attn.qkv.weight[channels:], attn.qkv.bias[channels:]).chunk(2, -1)
    o = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    kept = gathered + attn.proj(o.transpose(1, 2).flatten(2))
    kept = kept + block.mlp(block.norm2(kept))
    return x.index_copy(1, index, kept)


def ours(block: Block, x, n):
    kept, _ = ps.ops.pruned_msa(x, n, block.attn.num_heads, *_msa_args(block))
    return ps.ops.pruned_mlp(kept, *_mlp_args(block))


def backward(fn, block, x, arg):
    out = fn(block, x, arg)
    torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))


def torch_prefix_model(model, plan, images):
    x = model.embed(images)[:, plan.token_order]
    for block, n in zip(model.blocks, plan.keep_counts, strict=True):
        x[:, :n] = torch_prefix(block, x, n)
    return model.forward_head(x)


def pyramid_plan(depth_ratios):
    counts = [max(1, round(r * TOKENS)) for r in depth_ratios]
    return ps.SlimPlan(torch.arange(TOKENS), counts)


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


def model_rows(args, device, dtype):
    rows, records = [], []
    plan = pyramid_plan(PYRAMID)
    for name, factory in (
        ("DeiT-Ti", ps.deit_tiny_patch16_224),
        ("DeiT-S", ps.deit_small_patch16_224),
        ("DeiT-B", ps.deit_base_patch16_224),
    ):
        model = factory().to(device, dtype).eval()
        pruned = ps.PrunedViT(model, plan)
        images = torch.randn(args.model_batch, 3, 224, 224).to(device, dtype)
        dense_flops = ps.flops_of(model.config)
        slim_flops = ps.flops_of(model.config, plan.keep_counts)
        with torch.no_grad():
            t_dense = median_seconds(partial(model, images), args.min_run_time)
            t_ours = median_seconds(partial(pruned, images), args.min_run_time)
            t_prefix = median_seconds(
                partial(torch_prefix_model, model, plan, images), args.min_run_time
            )
        flop_cut = 1 - slim_flops / dense_flops
        time_cut = 1 - t_ours / t_dense
        record = {
            "model": name,
            "batch": args.model_batch,
            "keep_counts": list(plan.keep_counts),
            "dense_gflops": dense_flops / 1e9,
            "slim_gflops": slim_flops / 1e9,
            "dense_ms": t_dense * 1e3,
            "ours_ms": t_ours * 1e3,
            "prefix_ms": t_prefix * 1e3,
            "flop_reduction": flop_cut,
            "time_reduction": time_cut,
            "ratio": time_cut / flop_cut,
        }
        records.append(record)
        rows.append(
            [
                name,
                f"{dense_flops / 1e9:.2f} -> {slim_flops / 1e9:.2f}",
                f"{100 * flop_cut:.1f}%",
                f"{t_dense * 1e3:.0f}",
                f"{t_ours * 1e3:.0f}",
                f"{t_prefix * 1e3:.0f}",
                f"{100 * time_cut:.1f}%",
                f"{time_cut / flop_cut:.2f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    headers = [
        "model",
        "GFLOPs dense -> slim",
        "FLOP reduction",
        "dense ms",
        "PrunedViT ms",
        "(a) prefix ms",
        "time reduction",
        "time/FLOP reduction",
    ]
    return records, markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument(
        "--batch", type=int, default=None, help="per-block batch (16 CPU, 256 CUDA)"
    )
    parser.add_argument("--model-batch", type=int, default=None, help="end-to-end batch (32 / 256)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.batch = args.batch or (256 if cuda else 16)
    args.model_batch = args.model_batch or (256 if cuda else 32)

    block_records, block_table = block_rows(args, args.device, dtype)
    model_records, model_table = model_rows(args, args.device, dtype)
    where = f"{args.device} {dtype}, on {machine(args.device)}"
    header = (
        f"Pruned blocks (batch {args.batch}, N={TOKENS}) and slimmed models "
        f"(batch {args.model_batch}, pyramid plan), {where}; random weights"
    )
    table = f"{block_table}\n\n{model_table}"
    path = save(f"pruned_block_{args.device}", block_records + model_records, table, header)
    print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
