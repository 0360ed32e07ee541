"""Pruned blocks: patchslim's ops against plain torch (whole models: bench_models.py).

Per block (N=197, DeiT-Ti/S/B widths), updating the first n of N tokens, per dtype:
  ours       patchslim.pruned_msa + pruned_mlp (returning the attention probabilities)
  ours_      pruned_msa_ + pruned_mlp_ in place (no probabilities; PrunedViT's no_grad path)
  reference  the ops' references beside them (patchslim_ext.ops.pruned_block): plain torch
             with an explicit softmax, as the probabilities are returned
  (a) prefix the same prefix maths from torch ops with SDPA (no probabilities)
  (b) gather the gather -> SDPA -> scatter formulation of token-pruning code
  (c) dense  the unpruned block
Forward under no_grad, and forward+backward (ours and the reference). With --isas, the
in-place ops are also timed under each listed CPU ISA (PATCHSLIM_CPU_ISA), side by side.
The result files record the machine's load average before and after: run it on a quiet
machine.

    python bench/bench_pruned_block.py [--device cpu|cuda] [--dtypes float32 bfloat16]
    python bench/bench_pruned_block.py --dtypes bfloat16 --isas avx512 avx512_bf16
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, save

import patchslim_ext as ps
from patchslim_ext.benchmark import describe_machine, markdown_table
from patchslim_ext.ops.pruned_block import (
    _pruned_mlp_inplace_reference,
    _pruned_mlp_reference,
    _pruned_msa_inplace_reference,
    _pruned_msa_reference,
    _split_heads,
)
from patchslim_ext.pruning import mlp_arguments, msa_arguments
from patchslim_ext.vit import Block, ViTConfig

MODELS = {"DeiT-Ti": (192, 3), "DeiT-S": (384, 6), "DeiT-B": (768, 12)}
TOKENS = 197


def torch_prefix(block: Block, x, n):
    """(a): the pruned block from torch ops, in place on a copy of x (the in-place ops'
    references: slices, F.linear, F.layer_norm, SDPA)."""
    x = x.clone()
    _pruned_msa_inplace_reference(x, n, block.attn.num_heads, *msa_arguments(block))
    _pruned_mlp_inplace_reference(x[:, :n], *mlp_arguments(block))
    return x


def torch_gather(block: Block, x, index):
    """(b): gather the kept tokens, attend to all, scatter them back."""
    attn, heads = block.attn, block.attn.num_heads
    channels = x.shape[-1]
    gathered = x.index_select(1, index)
    h = block.norm1(x)
    q = F.linear(h.index_select(1, index), attn.qkv.weight[:channels], attn.qkv.bias[:channels])
    k, v = F.linear(h, attn.qkv.weight[channels:], attn.qkv.bias[channels:]).chunk(2, -1)
    o = F.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    )
    kept = gathered + attn.proj(o.transpose(1, 2).flatten(2))
    kept = kept + block.mlp(block.norm2(kept))
    return x.index_copy(1, index, kept)


def ours(block: Block, x, n):
    kept, _ = ps.ops.pruned_msa(x, n, block.attn.num_heads, *msa_arguments(block))
    return ps.ops.pruned_mlp(kept, *mlp_arguments(block))


def ours_in_place(block: Block, x, n):
    """The in-place ops on a copy of x (the copy is part of the time: < 1% here)."""
    x = x.clone()
    torch.ops.patchslim.pruned_msa_(x, n, block.attn.num_heads, *msa_arguments(block))
    torch.ops.patchslim.pruned_mlp_(x[:, :n], *mlp_arguments(block))
    return x


def reference(block: Block, x, n):
    kept, _ = _pruned_msa_reference(x, n, block.attn.num_heads, *msa_arguments(block))[:2]
    return _pruned_mlp_reference(kept, *mlp_arguments(block))[0]


def backward(fn, block, x, arg):
    out = fn(block, x, arg)
    torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))


FORWARD = {
    "ours": ours,
    "ours_": ours_in_place,
    "reference": reference,
    "prefix": torch_prefix,
    "dense": lambda block, x, n: block(x),
}


@contextmanager
def cpu_isa(isa: str):
    """The kernels run with ``isa`` inside the block (the environment is read per call)."""
    before = os.environ.get("PATCHSLIM_CPU_ISA")
    os.environ["PATCHSLIM_CPU_ISA"] = isa
    try:
        yield
    finally:
        if before is None:
            del os.environ["PATCHSLIM_CPU_ISA"]
        else:
            os.environ["PATCHSLIM_CPU_ISA"] = before


def block_rows(args, device, dtype):
    rows, records = [], []
    gen = torch.Generator().manual_seed(0)
    for model, (channels, heads) in MODELS.items():
        block = Block(ViTConfig(embed_dim=channels, num_heads=heads)).to(device, dtype)
        x = torch.randn(args.batch, TOKENS, channels, generator=gen).to(device, dtype)
        for ratio in args.ratios:
            n = max(1, round(ratio * TOKENS))
            index = torch.randperm(TOKENS, generator=gen)[:n].sort().values.to(device)
            with torch.no_grad():
                times = {
                    name: median_seconds(partial(fn, block, x, n), args.min_run_time)
                    for name, fn in FORWARD.items()
                }
                times["gather"] = median_seconds(
                    partial(torch_gather, block, x, index), args.min_run_time
                )
                for isa in args.isas:
                    with cpu_isa(isa):
                        times[f"ours_{isa}"] = median_seconds(
                            partial(ours_in_place, block, x, n), args.min_run_time
                        )
            xg = x.detach().requires_grad_()
            for name in ("ours", "reference"):
                times[f"{name}_bwd"] = median_seconds(
                    partial(backward, FORWARD[name], block, xg, n), args.min_run_time
                )
            record = {
                "model": model,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": args.batch,
                "n_keep": n,
                "keep_ratio": n / TOKENS,
                **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            }
            records.append(record)
            rows.append(
                [
                    model,
                    record["dtype"],
                    f"{n} ({100 * n / TOKENS:.0f}%)",
                    *(
                        f"{times[k] * 1e3:.2f}"
                        for k in ("ours", "reference", "ours_", "prefix", "gather", "dense")
                    ),
                    f"{times['reference'] / times['ours']:.2f}x",
                    f"{times['prefix'] / times['ours_']:.2f}x",
                    f"{times['ours_bwd'] * 1e3:.1f}",
                    f"{times['reference_bwd'] * 1e3:.1f}",
                    f"{times['reference_bwd'] / times['ours_bwd']:.2f}x",
                    *(f"{times[f'ours_{isa}'] * 1e3:.2f}" for isa in args.isas),
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return records, rows


HEADERS = [
    "model",
    "dtype",
    "n kept",
    "ours ms",
    "reference ms",
    "ours in place ms",
    "(a) prefix SDPA ms",
    "(b) gather ms",
    "(c) dense ms",
    "ours vs reference",
    "in place vs (a)",
    "ours fwd+bwd ms",
    "reference fwd+bwd ms",
    "fwd+bwd speedup",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (CPU), bfloat16 (CUDA)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="per-block batch (16 CPU, 256 CUDA)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument(
        "--isas", nargs="+", default=[], help="CPU ISAs to time the in-place ops under too"
    )
    args = parser.parse_args()
    if args.isas and args.device != "cpu":
        parser.error("--isas is for --device cpu")
    cuda = args.device == "cuda"
    dtypes = args.dtypes or (["bfloat16"] if cuda else ["float32", "bfloat16"])
    args.batch = args.batch or (256 if cuda else 16)

    load_before = os.getloadavg()
    records, rows = [], []
    for dtype in dtypes:
        dtype_records, dtype_rows = block_rows(args, args.device, getattr(torch, dtype))
        records += dtype_records
        rows += dtype_rows
    load_after = os.getloadavg()
    load = (
        f"1/5/15-min load average {'/'.join(f'{v:.2f}' for v in load_before)} before, "
        f"{'/'.join(f'{v:.2f}' for v in load_after)} after, on {os.cpu_count()} CPUs"
    )
    for record in records:
        record["load_average_before"], record["load_average_after"] = load_before, load_after
    table = markdown_table(HEADERS + [f"in place ms, {isa}" for isa in args.isas], rows)
    where = f"{args.device}, on {describe_machine(args.device)}"
    header = f"Pruned blocks (batch {args.batch}, N={TOKENS}), {where}; random weights; {load}"
    name = f"pruned_block_{args.device}" + "".join(f"_{isa}" for isa in args.isas)
    path = save(name, records, table, header)
    print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
