"""``patchslim demo``: Algorithm 1 end to end on real handwritten digits.

The bundled checkpoint ``assets/digits_vit.safetensors`` is the demo ViT trained on
the 4,000 training digits (``assets/README.md`` has the exact command). The demo slims
it (Algorithm 1 on calibration images from the training split), fine-tunes it with
distillation, and compares dense and slimmed models on the 1,000 held-out digits:
fvcore FLOPs, top-1, measured CPU throughput and keep counts. It writes two PNGs, the
slimmed checkpoint, ``summary.json`` and Algorithm 1's run directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from patchslim_ext.benchmark import median_forward_seconds
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.data import load_digits
from patchslim_ext.files import atomic_write
from patchslim_ext.flops import count_flops
from patchslim_ext.plan import SlimPlan
from patchslim_ext.settings import DemoSettings
from patchslim_ext.slimming import slim
from patchslim_ext.training import evaluate, finetune
from patchslim_ext.vit import ViTConfig

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "digits_vit.safetensors"
THROUGHPUT_BATCH = 250
THROUGHPUT_REPEATS = 30
SHOWN_LABELS = (2, 3, 5, 8)
# The digit grid paints the patches a block leaves alone this colour, mixed with the
# digit: bright enough to show on MNIST's black background as well as on the strokes.
LEFT_ALONE_COLOUR = torch.tensor([1.0, 0.55, 0.1])
LEFT_ALONE_WEIGHT = 0.65


def run_demo(
    out_dir: str | Path, settings: DemoSettings | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Run the demo: writes the PNGs, the slimmed checkpoint, ``summary.json`` and the
    slimming run directory (a rerun with the same settings resumes from it) to
    ``out_dir`` and returns the summary."""
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "digits_vit_slim.safetensors"
    run_dir = out_dir / "slim.run"
    summary_json = out_dir / "summary.json"
    start = time.perf_counter()
    dense = load_model(DEMO_CHECKPOINT).eval()
    train_digits, test_digits = load_digits("train"), load_digits("test")
    dense_accuracy = evaluate(dense, test_digits)

    slim_start = time.perf_counter()
    result = slim(
        dense,
        train_digits,
        eps=settings.eps,
        r=settings.r,
        block_epochs=settings.block_epochs,
        calib_size=settings.calib_size,
        seed=settings.seed,
        run_dir=run_dir,
        progress=progress,
    )
    slim_seconds = time.perf_counter() - slim_start
    slimmed = result.model
    before_finetune = evaluate(slimmed, test_digits)
    finetune_start = time.perf_counter()
    finetune(
        slimmed,
        dense,
        train_digits,
        epochs=settings.finetune_epochs,
        lr=settings.finetune_lr,
        max_shift=settings.finetune_shift,
        seed=settings.seed,
        progress=progress,
    )
    finetune_seconds = time.perf_counter() - finetune_start
    slim_accuracy = evaluate(slimmed, test_digits)
    save_model(slimmed, checkpoint)

    images = test_digits.tensors[0]
    probe = images[:1]
    with torch.no_grad():
        dense_flops = count_flops(dense, (probe,))
        slim_flops = count_flops(slimmed, (probe,))
    batches = [
        images[i : i + THROUGHPUT_BATCH] for i in range(0, 3 * THROUGHPUT_BATCH, THROUGHPUT_BATCH)
    ]
    singles = [images[i : i + 1] for i in range(3)]
    throughput = {}
    for key, model in (("dense", dense), ("slim", slimmed)):
        batch_s = median_forward_seconds(model, batches, repeats=THROUGHPUT_REPEATS)
        single_s = median_forward_seconds(model, singles, repeats=THROUGHPUT_REPEATS)
        throughput[key] = {
            f"batch{THROUGHPUT_BATCH}_images_per_s": THROUGHPUT_BATCH / batch_s,
            "batch1_ms": 1e3 * single_s,
        }

    pyramid_png = out_dir / "kept_patches_per_block.png"
    digits_png = out_dir / "kept_patches_digits.png"
    plot_keep_counts(result.plan, pyramid_png)
    labels = test_digits.tensors[1]
    shown = torch.stack([torch.nonzero(labels == label)[0, 0] for label in SHOWN_LABELS])
    plot_kept_patches(images[shown], labels[shown], result.plan, dense.config, digits_png)
    summary = {
        "settings": asdict(settings),
        "keep_counts": list(result.plan.keep_counts),
        "dense": {"flops": dense_flops, **dense_accuracy, **throughput["dense"]},
        "slim": {
            "flops": slim_flops,
            **slim_accuracy,
            "top1_before_finetune": before_finetune["top1"],
            **throughput["slim"],
        },
        "flop_reduction": 1 - slim_flops / dense_flops,
        "top1_drop": dense_accuracy["top1"] - slim_accuracy["top1"],
        "blocks": [asdict(entry) for entry in sorted(result.log, key=lambda e: e.block)],
        "seconds": {
            "slim": slim_seconds,
            "finetune": finetune_seconds,
            "total": time.perf_counter() - start,
        },
        "threads": torch.get_num_threads(),
        # A directory ends with a separator, so that the list says which is which.
        "outputs": [
            *(str(path) for path in (pyramid_png, digits_png, checkpoint, summary_json)),
            os.path.join(run_dir, ""),
        ],
    }
    atomic_write(summary_json, lambda partial: partial.write_text(json.dumps(summary, indent=2)))
    return summary


def format_demo(summary: dict[str, Any]) -> list[str]:
    """The demo's summary as the lines it prints."""
    dense, slimmed = summary["dense"], summary["slim"]
    batch_key = f"batch{THROUGHPUT_BATCH}_images_per_s"
    batch_label = f"CPU img/s (batch {THROUGHPUT_BATCH})"
    rows = [
        ("", "dense", "slimmed"),
        ("fvcore GFLOPs", f"{dense['flops'] / 1e9:.4f}", f"{slimmed['flops'] / 1e9:.4f}"),
        ("top-1 (1,000 held-out digits)", f"{dense['top1']:.1f}%", f"{slimmed['top1']:.1f}%"),
        ("top-1 before fine-tuning", "", f"{slimmed['top1_before_finetune']:.1f}%"),
        (batch_label, f"{dense[batch_key]:.0f}", f"{slimmed[batch_key]:.0f}"),
        ("CPU ms (batch 1)", f"{dense['batch1_ms']:.2f}", f"{slimmed['batch1_ms']:.2f}"),
    ]
    lines = [f"{a:<32}{b:>12}{c:>12}" for a, b, c in rows]
    lines.append(
        f"FLOPs reduced by {100 * summary['flop_reduction']:.1f}%, "
        f"top-1 drop {summary['top1_drop']:+.1f} points"
    )
    lines.append(f"tokens kept per block (class token included): {summary['keep_counts']}")
    seconds = summary["seconds"]
    lines.append(
        f"slimming {seconds['slim']:.0f} s, fine-tuning {seconds['finetune']:.0f} s, "
        f"total {seconds['total']:.0f} s on {summary['threads']} "
        f"thread{'' if summary['threads'] == 1 else 's'}"
    )
    lines += [f"wrote {path}" for path in summary["outputs"]]
    return lines


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FileNotFoundError(
            "the demo's figures need matplotlib (pip install matplotlib, or the [demo] extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_keep_counts(plan: SlimPlan, path: str | Path) -> None:
    """Bar chart of the patches (tokens other than the class token) each block keeps;
    the printed keep counts are tokens, the class token included."""
    plt = _pyplot()
    patches = [n - 1 for n in plan.keep_counts]
    blocks = range(1, plan.depth + 1)
    figure, axes = plt.subplots(figsize=(6, 3.2))
    bars = axes.bar(blocks, patches, color="#3a6ea5")
    axes.bar_label(bars, fontsize=8)
    axes.axhline(plan.num_tokens - 1, color="grey", linestyle="--", linewidth=1, label="dense")
    axes.set_xlabel("block")
    axes.set_ylabel("patches kept\n(class token not counted)")
    axes.set_xticks(list(blocks))
    axes.set_title("Patches each block computes (slimmed digits ViT)")
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_kept_patches(
    images: torch.Tensor, labels: torch.Tensor, plan: SlimPlan, config: ViTConfig, path: str | Path
) -> None:
    """Digits (rows) with the patches each block computes (columns); the patches a
    block leaves alone are painted :data:`LEFT_ALONE_COLOUR` (legend below the grid)."""
    plt = _pyplot()
    grid = config.img_size // config.patch_size
    blocks = range(1, plan.depth + 1)
    figure, axes = plt.subplots(
        len(images), len(blocks), figsize=(1.05 * len(blocks), 1.2 * len(images)), squeeze=False
    )
    for column, block in enumerate(blocks):
        kept = plan.token_order[: plan.keep_counts[block - 1]]
        mask = torch.zeros(grid * grid, dtype=torch.bool)
        mask[kept[kept > 0] - 1] = True
        pixel_mask = mask.view(grid, grid).repeat_interleave(config.patch_size, 0)
        pixel_mask = pixel_mask.repeat_interleave(config.patch_size, 1)
        for row, (image, label) in enumerate(zip(images, labels, strict=True)):
            picture = image[0]
            grey = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
            rgb = torch.where(pixel_mask[..., None], grey[..., None], _left_alone(grey[..., None]))
            axes[row, column].imshow(rgb.numpy())
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                title = f"block {block}\n{int(mask.sum())} patches"
                axes[row, column].set_title(title, fontsize=7)
            if column == 0:
                axes[row, column].set_ylabel(f"label {int(label)}", fontsize=8)
    legend = [
        ("computed by the block", torch.zeros(3)),
        ("left alone (pruned) by the block", _left_alone(torch.zeros(3))),
    ]
    handles = [
        plt.Rectangle((0, 0), 1, 1, facecolor=colour.tolist(), edgecolor="grey", label=text)
        for text, colour in legend
    ]
    figure.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _left_alone(grey: torch.Tensor) -> torch.Tensor:
    """RGB of grey levels in [0, 1] (shape (..., 1)) in a patch a block leaves alone."""
    return (1 - LEFT_ALONE_WEIGHT) * grey + LEFT_ALONE_WEIGHT * LEFT_ALONE_COLOUR
