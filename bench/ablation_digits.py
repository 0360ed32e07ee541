"""Ablations of the demo (the paper's Table 3 and Fig. 7 questions) on the bundled digits
ViT, at matched FLOPs, before and after fine-tuning.

1. The reference: impact scores, tolerance schedule (the demo's settings) -> keep counts K.
2. Scores: impact, rollout, attn and random, each selecting tokens for the same counts K
   (``schedule="fixed"``), with block tuning and without (``block_epochs=0``: the
   selection alone, as in Fig. 7).
3. Schedules: tolerance (the reference) vs uniform (same count in every block but the
   last, FLOPs matched to the reference), impact scores.

Every slimmed model is then fine-tuned for the demo's epochs with distillation.
Top-1 is measured on the 1,000 held-out digits.

    python bench/ablation_digits.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save

from patchslim_ext import evaluate, finetune, flops_of, load_model, slim
from patchslim_ext.benchmark import describe_machine, markdown_table
from patchslim_ext.data import load_digits
from patchslim_ext.demo import DEMO_CHECKPOINT, DemoSettings


def main() -> None:
    settings = DemoSettings()
    dense = load_model(DEMO_CHECKPOINT).eval()
    train_digits, test_digits = load_digits("train"), load_digits("test")
    dense_top1 = evaluate(dense, test_digits)["top1"]
    common = dict(r=settings.r, calib_size=settings.calib_size, seed=settings.seed, progress=False)

    def run(label: str, block_epochs: int, fine_tune: bool, **options) -> dict:
        start = time.perf_counter()
        result = slim(dense, train_digits, block_epochs=block_epochs, **common, **options)
        record = {
            "variant": label,
            "block_epochs": block_epochs,
            "keep_counts": list(result.plan.keep_counts),
            "flop_reduction": 1 - result.flops / flops_of(dense.config),
            "top1_slimmed": evaluate(result.model, test_digits)["top1"],
        }
        if fine_tune:
            finetune(
                result.model, dense, train_digits, epochs=settings.finetune_epochs,
                lr=settings.finetune_lr, max_shift=settings.finetune_shift, seed=settings.seed,
                progress=False,
            )  # fmt: skip
            record["top1_finetuned"] = evaluate(result.model, test_digits)["top1"]
        record["seconds"] = time.perf_counter() - start
        print(record, flush=True)
        return record

    reference = run("impact, tolerance (reference)", settings.block_epochs, True, eps=settings.eps)
    counts = reference["keep_counts"]
    records = [reference]
    for score in ("impact", "rollout", "attn", "random"):
        records.append(
            run(f"{score}, fixed counts", settings.block_epochs, True, score=score,
                schedule="fixed", keep_counts=counts)
        )  # fmt: skip
        records.append(
            run(f"{score}, fixed counts, no block tuning", 0, False, score=score,
                schedule="fixed", keep_counts=counts)
        )  # fmt: skip
    records.append(
        run("impact, uniform", settings.block_epochs, True, schedule="uniform",
            flops_reduction=reference["flop_reduction"])
    )  # fmt: skip

    rows = [
        [
            r["variant"],
            f"{100 * r['flop_reduction']:.1f}%",
            f"{r['top1_slimmed']:.1f}",
            f"{r['top1_finetuned']:.1f}" if "top1_finetuned" in r else "—",
            ", ".join(map(str, r["keep_counts"])),
        ]
        for r in records
    ]
    table = markdown_table(
        ["variant", "FLOPs ↓", "top-1 slimmed", "top-1 fine-tuned", "keep counts"], rows
    )
    header = (
        f"Ablations on the digits ViT (dense top-1 {dense_top1:.1f}% on 1,000 held-out digits), "
        f"eps={settings.eps}, r={settings.r}, block_epochs={settings.block_epochs}, "
        f"calibration {settings.calib_size} images, fine-tuning {settings.finetune_epochs} "
        f"epochs; on {describe_machine('cpu')}"
    )
    path = save("ablation_digits", records, table, header)
    print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
