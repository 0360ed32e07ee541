"""Dense vs slimmed inference timing (the paper's Table 2), as a library.

``patchslim bench`` and ``bench/bench_models.py`` call :func:`compare`. Each row times,
in one run and under ``torch.no_grad()``: the dense model, the slimmed model through
our ops (the model with its plan set) and the same slimmed maths composed from
plain torch ops (:func:`torch_slimmed_forward`). Timing: warm-up calls, then at least
``repeats`` timed calls whose inputs rotate over several batches (so that no cache
holds the one input), CUDA events on the current stream or ``perf_counter`` on the CPU;
the median is reported with its spread (:func:`relative_spread`). Clocks are left as
they are.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patchslim_ext import _C
from patchslim_ext.flops import count_flops, flops_of
from patchslim_ext.ops import cpu_isa
from patchslim_ext.ops.pruned_block import (
    _pruned_mlp_inplace_reference,
    _pruned_msa_inplace_reference,
)
from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruning import mlp_arguments, msa_arguments
from patchslim_ext.settings import PAPER_FLOP_REDUCTION
from patchslim_ext.vit import MODEL_FACTORIES, VisionTransformer, ViTConfig

_ROTATING_BATCHES = 3
# A timing whose 10th–90th percentile range exceeds this fraction of its median says
# more about the machine's load than about the model.
NOISY_SPREAD = 0.2


def pyramid_plan(config: ViTConfig, flop_reduction: float) -> SlimPlan:
    """A pyramid plan (more tokens kept early) removing ``flop_reduction`` of the FLOPs.

    Block l < L keeps ``round(N · (1 − (l/(L−1))^γ))`` tokens (at least the prefix
    tokens), the last block the tokens the head reads; γ is found by bisection so that
    the FLOP reduction is as close to the target as integer counts allow. The token
    order is the identity (for timing, which tokens are kept does not matter).
    """
    tokens, depth = config.num_tokens, config.depth
    prefix, last = config.num_prefix_tokens, [config.num_head_tokens]
    dense = flops_of(config)
    if not 0.0 < flop_reduction < 1.0 - flops_of(config, [prefix] * (depth - 1) + last) / dense:
        raise ValueError(f"flop_reduction {flop_reduction} is out of reach for this model")

    def counts(gamma: float) -> list[int]:
        ratios = [1.0 - (b / (depth - 1)) ** gamma for b in range(depth - 1)]
        return [max(prefix, round(tokens * ratio)) for ratio in ratios] + last

    def reduction(gamma: float) -> float:
        return 1.0 - flops_of(config, counts(gamma)) / dense

    low, high = 1e-3, 1e3  # reduction falls as gamma grows
    for _ in range(100):
        middle = (low * high) ** 0.5
        if reduction(middle) > flop_reduction:
            low = middle
        else:
            high = middle
    best = min((low, high), key=lambda gamma: abs(reduction(gamma) - flop_reduction))
    return SlimPlan(torch.arange(tokens), counts(best), prefix)


def torch_slimmed_forward(
    model: VisionTransformer,
    plan: SlimPlan,
    images: Tensor,
    *,
    token_order: Tensor | None = None,
) -> Tensor:
    """The slimmed model's logits through the references of our in-place ops (slices,
    ``F.linear``, ``F.layer_norm``, SDPA): the same maths in plain torch, the baseline of
    our ops. For inference (under ``torch.no_grad()``). ``token_order``: the plan's,
    already on the images' device (a CUDA graph cannot capture the copy there)."""
    if token_order is None:
        token_order = plan.token_order.to(images.device)
    x = model.embed(images).index_select(1, token_order)
    for block, n_keep in zip(model.blocks, plan.keep_counts, strict=True):
        _pruned_msa_inplace_reference(x, n_keep, block.attn.num_heads, *msa_arguments(block))
        _pruned_mlp_inplace_reference(x[:, :n_keep], *mlp_arguments(block))
    return model.forward_head(model.norm(x[:, : model.config.num_head_tokens]))


def forward_seconds(
    forward: Callable[[Tensor], Tensor],
    batches: Sequence[Tensor],
    *,
    repeats: int = 30,
    warmup: int = 3,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``forward(batch)`` rotating over
    ``batches``, after ``warmup`` untimed calls."""
    device = batches[0].device
    with torch.no_grad():
        for index in range(warmup):
            forward(batches[index % len(batches)])
        times = []
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            for index in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                forward(batches[index % len(batches)])
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for index in range(repeats):
                start_time = time.perf_counter()
                forward(batches[index % len(batches)])
                times.append(time.perf_counter() - start_time)
    return times


def median_forward_seconds(
    forward: Callable[[Tensor], Tensor],
    batches: Sequence[Tensor],
    *,
    repeats: int = 30,
    warmup: int = 3,
) -> float:
    """Median of :func:`forward_seconds`."""
    return statistics.median(forward_seconds(forward, batches, repeats=repeats, warmup=warmup))


def relative_spread(times: Sequence[float]) -> float:
    """The range from the 10th to the 90th percentile of ``times`` over their median
    (0 for a single time): how far the runs disagree, whatever their number."""
    if len(times) < 2:
        return 0.0
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return (deciles[-1] - deciles[0]) / statistics.median(times)


def cuda_graph_forward(forward: Callable[[Tensor], Tensor], example: Tensor) -> Callable:
    """``forward`` captured in a CUDA graph: the returned callable copies its batch into
    the static input and replays the graph."""
    static_input = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            forward(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_output = forward(static_input)

    def replay(batch: Tensor) -> Tensor:
        static_input.copy_(batch)
        graph.replay()
        return static_output

    return replay


def peak_memory_bytes(forward: Callable[[Tensor], Tensor], batch: Tensor) -> int:
    """Peak bytes allocated during one ``forward(batch)`` beyond what was live before
    (weights and inputs excluded). CUDA: the caching allocator's peak; CPU: the CPU
    allocator's reports of every allocation and free, summed as they come
    (``_C.cpu_peak_memory_bytes``, the profiler's memory events without a profiler)."""
    with torch.no_grad():
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
            torch.cuda.reset_peak_memory_stats(batch.device)
            before = torch.cuda.memory_allocated(batch.device)
            forward(batch)
            torch.cuda.synchronize(batch.device)
            return torch.cuda.max_memory_allocated(batch.device) - before
        return _C.cpu_peak_memory_bytes(lambda: forward(batch))


@dataclass
class BenchRow:
    """One model, batch, dtype and device: dense vs slimmed (ours and plain torch)."""

    model: str
    device: str
    dtype: str
    batch: int
    cuda_graphs: bool
    keep_counts: list[int]
    dense_flops: int
    slim_flops: int
    dense_ms: float  # medians
    slim_ms: float
    torch_slim_ms: float
    dense_spread: float  # relative_spread of the same timings
    slim_spread: float
    torch_slim_spread: float
    dense_peak_mb: float
    slim_peak_mb: float

    @property
    def flop_reduction(self) -> float:
        return 1.0 - self.slim_flops / self.dense_flops

    @property
    def time_reduction(self) -> float:
        return 1.0 - self.slim_ms / self.dense_ms

    @property
    def dense_images_per_s(self) -> float:
        return 1e3 * self.batch / self.dense_ms

    @property
    def slim_images_per_s(self) -> float:
        return 1e3 * self.batch / self.slim_ms

    @property
    def spread(self) -> float:
        """The widest spread of the row's three timings."""
        return max(self.dense_spread, self.slim_spread, self.torch_slim_spread)

    @property
    def noisy(self) -> bool:
        """Whether a timing of the row spreads by more than :data:`NOISY_SPREAD`."""
        return self.spread > NOISY_SPREAD

    def to_dict(self) -> dict:
        values = asdict(self)
        values.update(
            spread=self.spread,
            flop_reduction=self.flop_reduction,
            time_reduction=self.time_reduction,
            ratio=self.time_reduction / self.flop_reduction,
            dense_images_per_s=self.dense_images_per_s,
            slim_images_per_s=self.slim_images_per_s,
        )
        return values


def compare(
    name: str,
    model: VisionTransformer,
    plan: SlimPlan,
    *,
    batch: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 30,
    cuda_graphs: bool = False,
) -> BenchRow:
    """Time the dense model, the model with ``plan`` set and :func:`torch_slimmed_forward`
    on random images (B, in_chans, H, W); FLOPs counted by fvcore at batch 1."""
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs needs a CUDA device")
    config = model.config
    model = model.to(device, dtype).eval()
    slimmed = copy.deepcopy(model).set_plan(plan)
    batches = random_batches(config, batch, _ROTATING_BATCHES, device=device, dtype=dtype)
    probe = batches[0][:1]
    with torch.no_grad():
        dense_flops = count_flops(model, (probe,))
        slim_flops = count_flops(slimmed, (probe,))
    token_order = plan.token_order.to(device)
    forwards: dict[str, Callable[[Tensor], Tensor]] = {
        "dense": model,
        "slim": slimmed,
        "torch_slim": lambda images: torch_slimmed_forward(
            model, plan, images, token_order=token_order
        ),
    }
    if cuda_graphs:
        forwards = {key: cuda_graph_forward(fn, batches[0]) for key, fn in forwards.items()}
    times = {key: forward_seconds(fn, batches, repeats=repeats) for key, fn in forwards.items()}
    median_ms = {key: 1e3 * statistics.median(seconds) for key, seconds in times.items()}
    return BenchRow(
        model=name,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        cuda_graphs=cuda_graphs,
        keep_counts=list(plan.keep_counts),
        dense_flops=dense_flops,
        slim_flops=slim_flops,
        dense_ms=median_ms["dense"],
        slim_ms=median_ms["slim"],
        torch_slim_ms=median_ms["torch_slim"],
        dense_spread=relative_spread(times["dense"]),
        slim_spread=relative_spread(times["slim"]),
        torch_slim_spread=relative_spread(times["torch_slim"]),
        dense_peak_mb=peak_memory_bytes(model, batches[0]) / 2**20,
        slim_peak_mb=peak_memory_bytes(slimmed, batches[0]) / 2**20,
    )


# The columns of the README's Table 2 (a test keeps the two the same). "spread" is
# BenchRow.spread, "time ↓" the measured time reduction, "ratio" time ↓ over FLOPs ↓,
# "plain torch ↓" the time reduction of the slimmed maths composed from torch ops.
TABLE_HEADERS = (
    "model",
    "device, dtype",
    "batch",
    "GFLOPs dense → slim",
    "FLOPs ↓",
    "ms dense → slim",
    "spread",
    "time ↓",
    "ratio",
    "plain torch ↓",
    "img/s dense → slim",
    "peak MB dense → slim",
)


_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def significant(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant digits, without an exponent:
    0.30612 → "0.306", 21.94 → "21.9", 7000.1 → "7000"."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    rounded = float(f"{value:.{digits - 1}e}")
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"


def table_row(row: BenchRow) -> list[str]:
    """A Markdown table row for ``row`` (columns: :data:`TABLE_HEADERS`)."""
    torch_reduction = 1.0 - row.torch_slim_ms / row.dense_ms
    batch = f"{row.batch}{' (CUDA graph)' if row.cuda_graphs else ''}"
    return [
        row.model,
        f"{row.device.upper()} {_SHORT_DTYPES.get(row.dtype, row.dtype)}",
        batch,
        f"{significant(row.dense_flops / 1e9)} → {significant(row.slim_flops / 1e9)}",
        f"{100 * row.flop_reduction:.1f}%",
        f"{significant(row.dense_ms)} → {significant(row.slim_ms)}",
        f"{100 * row.spread:.1f}%",
        f"{100 * row.time_reduction:.1f}%",
        f"{row.time_reduction / row.flop_reduction:.2f}",
        f"{100 * torch_reduction:.1f}%",
        f"{significant(row.dense_images_per_s)} → {significant(row.slim_images_per_s)}",
        f"{significant(row.dense_peak_mb)} → {significant(row.slim_peak_mb)}",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bfloat16 natively (AVX512-BF16, which every CPU
    with AMX also has). Without it torch's bf16 GEMMs are emulated: on a 2-core AVX2 AMD
    EPYC, DeiT-S ran 7.7x slower in bf16 than in float32 (docs/design.md §11)."""
    return _C.detected_cpu_isa() == "avx512_bf16"


def describe_machine(device: str | torch.device) -> str:
    """One line naming where the numbers came from."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return (
        f"{platform.processor() or platform.machine()}, {threads} thread{'s' * (threads != 1)}, "
        f"{cpu_isa()} kernels ({_C.detected_cpu_isa()} detected), torch {torch.__version__}, "
        f"{_cpu_allocator()}"
    )


def _cpu_allocator() -> str:
    """The malloc that torch's CPU tensors come from, as far as the environment says: a
    preloaded allocator, or glibc's with the tunables that decide whether freed memory is
    kept (the difference between ~0 and ~1,400 page faults per batch-1 T2T-ViT forward)."""
    libraries = (Path(library).name for library in os.environ.get("LD_PRELOAD", "").split())
    preload = [name for name in libraries if "malloc" in name]  # jemalloc, tcmalloc, …
    if preload:
        return f"allocator {' '.join(preload)} (LD_PRELOAD)"
    tunables = sorted(
        f"{key}={value}"
        for key, value in os.environ.items()
        if key.startswith("MALLOC_") or (key == "GLIBC_TUNABLES" and "malloc" in value)
    )
    return f"glibc malloc ({' '.join(tunables) or 'default settings'})"


def run_benchmarks(
    models: Sequence[str],
    *,
    batches: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 30,
    cuda_graphs: bool = False,
    progress: bool = True,
) -> list[BenchRow]:
    """:func:`compare` for each model (random weights, seed 0) with its
    :func:`pyramid_plan` at the paper's FLOP reduction, at each batch size; with
    ``cuda_graphs``, batch 1 is also timed replayed from CUDA graphs."""
    check_paper_models(models)
    jobs = timing_jobs(batches, cuda_graphs)
    rows = []
    # A bar on a terminal only (disable=None): in a log every redraw stays, and tqdm
    # draws the finished bar twice (last update, then close).
    with tqdm(
        total=len(models) * len(jobs), desc="bench", disable=None if progress else True, unit="row"
    ) as bar:
        for name in models:
            # Built once for all its rows: compare leaves the weights as they are.
            model, plan = paper_model(name)
            for batch, graphs in jobs:
                rows.append(
                    compare(
                        name,
                        model,
                        plan,
                        batch=batch,
                        dtype=dtype,
                        device=device,
                        repeats=repeats,
                        cuda_graphs=graphs,
                    )
                )
                bar.update()
    return rows


def timing_jobs(batches: Sequence[int], cuda_graphs: bool) -> list[tuple[int, bool]]:
    """(batch, replayed from CUDA graphs) for each row of one model: every batch size,
    and with ``cuda_graphs`` batch 1 once more, from CUDA graphs."""
    return [(batch, False) for batch in batches] + ([(1, True)] if cuda_graphs else [])


def check_paper_models(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first of ``names`` without a paper plan."""
    unknown = sorted(set(names) - set(PAPER_FLOP_REDUCTION))
    if unknown:
        raise ValueError(
            f"no paper plan for {unknown[0]!r}; choose from {sorted(PAPER_FLOP_REDUCTION)}"
        )


def paper_model(name: str) -> tuple[VisionTransformer, SlimPlan]:
    """The dense model ``name`` with random weights (seed 0), on the CPU in float32, and
    its :func:`pyramid_plan` at the paper's FLOP reduction."""
    check_paper_models([name])
    torch.manual_seed(0)
    model = MODEL_FACTORIES[name]().eval()
    return model, pyramid_plan(model.config, PAPER_FLOP_REDUCTION[name])


def random_batches(
    config: ViTConfig,
    batch: int,
    count: int,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
) -> list[Tensor]:
    """``count`` batches of random images (batch, in_chans, H, W), seed 0. Drawn where
    they are used: on a GPU machine's few, shared cores, drawing batches of 1,024 images
    on the CPU took longer than timing the models."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, config.in_chans, config.img_size, config.img_size)
    return [
        torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(count)
    ]
