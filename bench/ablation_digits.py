"""Ablations of Algorithm 1 (the paper's Table 3 and Fig. 7 questions) on two digit
ViTs, at matched FLOPs, before and after fine-tuning, over several seeds.

For each model and seed:

1. The reference: impact scores, tolerance schedule at the model's eps -> keep counts K.
2. Scores: impact, rollout, attn and random, each selecting tokens for the same counts K
   (``schedule="fixed"``), with block tuning and without (``block_epochs=0``: the
   selection alone, as in Fig. 7).
3. Schedules: tolerance (the reference) vs uniform (one count in every block but the
   last, FLOPs matched to the reference), impact scores.

Every tuned variant is then fine-tuned with the demo's settings (soft distillation from
the dense model). Top-1 is measured on the 1,000 held-out digits. The seed sets the
calibration draw, the random scores, block tuning and fine-tuning. Results are mean ±
standard error over seeds; differences between scores are paired by seed.

The models are the bundled demo ViT (12 blocks, C = 96) and the second architecture of
``single_block_pruning.py`` (8 blocks, C = 64, trained and cached by ``pruning_lab``).
Finished runs are cached in ``--cache`` so that an interrupted run continues.

    python bench/ablation_digits.py --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save
from pruning_lab import MODEL_NAMES, fmt, load_models, log, mean_se

from patchslim_ext import evaluate, finetune, flops_of, slim
from patchslim_ext.benchmark import describe_machine, markdown_table
from patchslim_ext.data import load_digits
from patchslim_ext.demo import DemoSettings

# Tolerance of each model's reference run: the demo's (43.4% fewer FLOPs), and for the
# second model the eps that slim(flops_reduction=0.43, seed=0) found on it (41.7%).
REFERENCE_EPS = {"demo_d12c96": DemoSettings.eps, "second_d8c64": 0.00177}
SCORES = ("impact", "rollout", "attn", "random")
REFERENCE = "impact, tolerance (reference)"
UNIFORM = "impact, uniform"


def variants() -> list[str]:
    names = [REFERENCE]
    for score in SCORES:
        names += [f"{score}, fixed counts", f"{score}, fixed counts, no block tuning"]
    return [*names, UNIFORM]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", type=Path, default=Path("runs/ablation"))
    return parser.parse_args()


def run_seed(
    model_name: str, dense: Any, seed: int, digits: tuple[Any, Any], done: dict[str, dict]
) -> None:
    """Every variant of one model and seed, into ``done`` (variant -> record), skipping
    the variants already there. ``digits``: the training and held-out datasets."""
    settings = DemoSettings()
    train_digits, test_digits = digits
    common = dict(r=settings.r, calib_size=settings.calib_size, seed=seed, progress=False)

    def run(label: str, block_epochs: int, fine_tune: bool, **options: Any) -> None:
        if label in done:
            return
        start = time.perf_counter()
        result = slim(dense, train_digits, block_epochs=block_epochs, **common, **options)
        record = {
            "model": model_name,
            "seed": seed,
            "variant": label,
            "block_epochs": block_epochs,
            "keep_counts": list(result.plan.keep_counts),
            "flop_reduction": 1 - result.flops / flops_of(dense.config),
            "top1_slimmed": evaluate(result.model, test_digits)["top1"],
        }
        if fine_tune:
            finetune(
                result.model, dense, train_digits, epochs=settings.finetune_epochs,
                lr=settings.finetune_lr, max_shift=settings.finetune_shift, seed=seed,
                progress=False,
            )  # fmt: skip
            record["top1_finetuned"] = evaluate(result.model, test_digits)["top1"]
        record["seconds"] = time.perf_counter() - start
        log(f"{model_name} seed {seed}: {record}")
        done[label] = record

    run(REFERENCE, settings.block_epochs, True, eps=REFERENCE_EPS[model_name])
    counts = done[REFERENCE]["keep_counts"]
    for score in SCORES:
        fixed = dict(score=score, schedule="fixed", keep_counts=counts)
        run(f"{score}, fixed counts", settings.block_epochs, True, **fixed)
        run(f"{score}, fixed counts, no block tuning", 0, False, **fixed)
    run(
        UNIFORM, settings.block_epochs, True, schedule="uniform",
        flops_reduction=done[REFERENCE]["flop_reduction"],
    )  # fmt: skip


def summary_rows(records: list[dict]) -> list[list[str]]:
    """Mean ± s.e. over seeds of every variant."""
    rows = []
    for variant in variants():
        mine = [r for r in records if r["variant"] == variant]
        if not mine:
            continue
        tuned = [r["top1_finetuned"] for r in mine if "top1_finetuned" in r]
        rows.append([
            variant,
            f"{100 * mean_se([r['flop_reduction'] for r in mine])[0]:.1f}%",
            fmt([r["top1_slimmed"] for r in mine]),
            fmt(tuned) if tuned else "—",
            str(len(mine)),
        ])  # fmt: skip
    return rows


def difference_rows(records: list[dict]) -> list[list[str]]:
    """impact − other score, paired by seed: no tuning, block-tuned, fine-tuned."""
    by_key = {(r["seed"], r["variant"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    rows = []
    for other in SCORES[1:]:
        cells = [f"impact − {other}"]
        for suffix, field in (
            (", fixed counts, no block tuning", "top1_slimmed"),
            (", fixed counts", "top1_slimmed"),
            (", fixed counts", "top1_finetuned"),
        ):
            differences = [
                by_key[(s, f"impact{suffix}")][field] - by_key[(s, f"{other}{suffix}")][field]
                for s in seeds
                if (s, f"impact{suffix}") in by_key and (s, f"{other}{suffix}") in by_key
            ]
            cells.append(f"{fmt(differences)}" if differences else "—")
        rows.append(cells)
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    cache = args.cache / "records.json"
    records: list[dict] = json.loads(cache.read_text()) if cache.is_file() else []
    models = load_models(Path("runs/fig67"))
    digits = load_digits("train"), load_digits("test")
    for model_name in args.models:
        dense = models[model_name][0]
        for seed in args.seeds:
            done = {
                r["variant"]: r for r in records if r["model"] == model_name and r["seed"] == seed
            }
            before = len(done)
            try:
                run_seed(model_name, dense, seed, digits, done)
            finally:
                new = [r for r in done.values() if r not in records]
                if len(done) > before:
                    records += new
                    cache.write_text(json.dumps(records, indent=1))

    test_digits = digits[1]
    sections = []
    for model_name in args.models:
        mine = [r for r in records if r["model"] == model_name and r["seed"] in args.seeds]
        dense_top1 = evaluate(models[model_name][0], test_digits)["top1"]
        references = sorted((r for r in mine if r["variant"] == REFERENCE), key=lambda r: r["seed"])
        sections.append(
            f"### {model_name} (dense top-1 {dense_top1:.1f}%, reference eps "
            f"{REFERENCE_EPS[model_name]})\n\nReference keep counts (class token included), "
            "seed by seed: "
            + "; ".join(", ".join(map(str, r["keep_counts"])) for r in references)
            + "\n\n"
            + markdown_table(
                ["variant", "FLOPs ↓", "top-1 slimmed", "top-1 fine-tuned", "seeds"],
                summary_rows(mine),
            )
            + "\n\nPaired differences (points, mean ± s.e. over seeds):\n\n"
            + markdown_table(
                ["", "selection only", "block-tuned", "fine-tuned"], difference_rows(mine)
            )
        )
    settings = DemoSettings()
    header = (
        f"Ablations on the digit ViTs, seeds {', '.join(map(str, args.seeds))} (mean ± s.e.), "
        f"r={settings.r}, block_epochs={settings.block_epochs}, calibration "
        f"{settings.calib_size} images, fine-tuning {settings.finetune_epochs} epochs; top-1 on "
        f"the 1,000 held-out digits; on {describe_machine('cpu')}"
    )
    selected = [r for r in records if r["model"] in args.models and r["seed"] in args.seeds]
    path = save("ablation_digits", selected, "\n\n".join(sections), header)
    print(f"\n{header}\n\n" + "\n\n".join(sections) + f"\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
