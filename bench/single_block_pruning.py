"""The paper's Figs. 6 and 7 on our digits models: prune ONE block, all others dense.

For every block l of each model, every pruning rate 0, 10, …, 90 % of the patch tokens
(the class token is always kept) and every score (impact = Eq. 13, attn = the paper's
``Σ_h ‖P_l^h[i, :]‖²``, random), block l keeps the patches with the largest
calibration-mean scores and the model is evaluated on the 1,000 held-out digits, without
fine-tuning or block tuning (paper Eq. 2 with masks, see ``pruning_lab``). A seed is a
calibration draw from the training digits plus the random scores' generator.

- Fig. 7: top-1 against the pruning rate for the blocks at the paper's relative depths
  (3, 7, 11 of 12) and block 1, one curve per score, mean ± s.e. over seeds (and all
  blocks in a second figure).
- Fig. 6: top-1 against the pruning rate for every block (impact scores), and top-1
  against the block for fixed rates (the paper's Fig. 6(d)).

Writes ``single_block_pruning.{md,json}`` and PNGs to the results folder. Outcomes are
memoised in the cache folder (``outcomes_<model>.json``), so a rerun is quick.

    python bench/single_block_pruning.py [--seeds 0 1 2] [--calib-size 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pruning_lab as lab
from common import RESULTS

from patchslim_ext.benchmark import describe_machine, markdown_table
from patchslim_ext.vit import VisionTransformer

COLORS = {"impact": "tab:red", "attn": "tab:blue", "random": "tab:gray"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("runs/fig67"),
        help="the trained second model and the memoised outcomes (not committed)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calib-size", type=int, default=500)
    return parser.parse_args()


def run_model(
    name: str,
    model: VisionTransformer,
    seeds: list[int],
    calib_size: int,
    cache_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (seed, block, score, rate) outcome of one model, and checks/timings."""
    images, labels = lab.held_out_digits()
    timer = lab.Timer()
    with timer("check"):
        checks = lab.check_single_block_forward(model, images[:64])
    lab.log(f"{name}: single-block forward vs Eq. 2 references: {checks}")
    with timer("dense"):
        evaluator = lab.SingleBlockEvaluator(model, images, labels)
    memo = cache_dir / f"outcomes_{name}.json"
    evaluator.load_memo(memo)
    dense_top1 = 100.0 * float((evaluator.run.logits.argmax(-1) == labels).double().mean())
    depth = model.config.depth
    records = []
    for seed in seeds:
        with timer("calibration"):
            run = lab.dense_run(model, lab.calibration_images(seed, calib_size), keep_maps=True)
        for block in range(depth):
            for method in lab.BASE_METHODS:
                with timer("scores"):
                    scores = lab.library_scores(run, block, method, seed)
                for rate in lab.RATES:
                    with timer("evaluation"):
                        outcome = evaluator.outcome(block, lab.keep_mask(scores, rate))
                    records.append(outcome.record(name, seed, block, method, rate))
        lab.log(f"{name}: seed {seed} done, {evaluator.runs} pruned forwards so far")
        evaluator.save_memo(memo)
    info = {
        "dense_top1": dense_top1,
        "checks": checks,
        "seconds": timer.seconds,
        "pruned_forwards_run": evaluator.runs,
    }
    return records, info


def series(
    records: list[dict[str, Any]], model: str, block: int, method: str, key: str = "top1"
) -> tuple[list[float], list[float]]:
    """Mean and s.e. over seeds of ``key`` at each rate."""
    means, errors = [], []
    for rate in lab.RATES:
        values = [
            r[key]
            for r in records
            if (r["model"], r["block"], r["method"], r["rate"]) == (model, block, method, rate)
        ]
        mean, se = lab.mean_se(values)
        means.append(mean)
        errors.append(se)
    return means, errors


def per_seed(
    records: list[dict[str, Any]], model: str, method: str, blocks: list[int], rates: list[int]
) -> list[float]:
    """For each seed, the mean top-1 over ``blocks`` × ``rates``."""
    seeds = sorted({r["seed"] for r in records})
    out = []
    for seed in seeds:
        values = [
            r["top1"]
            for r in records
            if r["model"] == model
            and r["method"] == method
            and r["seed"] == seed
            and r["block"] in blocks
            and r["rate"] in rates
        ]
        out.append(sum(values) / len(values))
    return out


def plot_fig7(records: list[dict[str, Any]], model: str, depth: int, path: Path) -> None:
    # The paper's relative depths, and block 1, the most sensitive block on our models.
    blocks = sorted({1, *(b + 1 for b in lab.fig7_blocks(depth))})
    figure, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.4), sharey=True)
    for axis, block in zip(axes, blocks, strict=True):
        for method in lab.BASE_METHODS:
            means, errors = series(records, model, block, method)
            axis.errorbar(
                lab.RATES, means, yerr=errors, label=method, color=COLORS[method], capsize=2
            )
        axis.set_title(f"pruning block {block} of {depth}")
        axis.set_xlabel("pruning rate of the patches (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%), no fine-tuning")
    axes[0].legend()
    figure.suptitle(f"Fig. 7 on {model}: one block pruned, mean ± s.e. over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_all_blocks(records: list[dict[str, Any]], model: str, depth: int, path: Path) -> None:
    columns = 4
    rows = (depth + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.7 * rows), sharey=True)
    for index, axis in enumerate(axes.flat):
        if index >= depth:
            axis.axis("off")
            continue
        for method in lab.BASE_METHODS:
            means, errors = series(records, model, index + 1, method)
            axis.errorbar(
                lab.RATES, means, yerr=errors, label=method, color=COLORS[method], capsize=2
            )
        axis.set_title(f"block {index + 1}", fontsize=9)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"{model}: top-1 (%) vs pruning rate (%), each block pruned alone")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_fig6(records: list[dict[str, Any]], model: str, depth: int, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    colormap = plt.get_cmap("viridis")
    for block in range(1, depth + 1):
        means, errors = series(records, model, block, "impact")
        left.errorbar(
            lab.RATES,
            means,
            yerr=errors,
            color=colormap((block - 1) / max(1, depth - 1)),
            label=f"block {block}",
            capsize=2,
        )
    left.set_xlabel("pruning rate of the patches (%)")
    left.set_ylabel("top-1 (%), no fine-tuning")
    left.set_title("(a) each block pruned alone (impact scores)")
    left.legend(fontsize=7, ncol=2)
    left.grid(alpha=0.3)
    blocks = list(range(1, depth + 1))
    for rate in (30, 50, 70, 90):
        column = lab.RATES.index(rate)
        means = [series(records, model, b, "impact")[0][column] for b in blocks]
        errors = [series(records, model, b, "impact")[1][column] for b in blocks]
        right.errorbar(blocks, means, yerr=errors, marker="o", label=f"{rate}% pruned", capsize=2)
    right.set_xlabel("pruned block")
    right.set_title("(b) top-1 vs pruned block (as the paper's Fig. 6(d))")
    right.set_xticks(blocks)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle(f"Fig. 6 on {model}: redundancy vs depth, mean ± s.e. over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def tables(
    records: list[dict[str, Any]], model: str, depth: int, dense_top1: float
) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown section of one model and its summary rows."""
    rates = [rate for rate in lab.RATES if rate > 0]
    rows, summary = [], []
    for block in range(1, depth + 1):
        for method in lab.BASE_METHODS:
            means, errors = series(records, model, block, method)
            cells = [f"{m:.1f} ± {e:.1f}" for m, e in zip(means[1:], errors[1:], strict=True)]
            rows.append([block, method, *cells])
            for rate, mean, se in zip(lab.RATES, means, errors, strict=True):
                summary.append(
                    {"model": model, "block": block, "method": method, "rate": rate,
                     "top1_mean": round(mean, 3), "top1_se": round(se, 3)}
                )  # fmt: skip
    full = markdown_table(["block", "score", *[f"{r}%" for r in rates]], rows)

    # Per block, the mean over rates 10..90 (a seed's curve averaged), ± s.e. over seeds,
    # and the paired differences impact − attn and impact − random.
    compact = []
    for block in [*range(1, depth + 1), None]:
        blocks = list(range(1, depth + 1)) if block is None else [block]
        values = {m: per_seed(records, model, m, blocks, rates) for m in lab.BASE_METHODS}
        diff_attn = [a - b for a, b in zip(values["impact"], values["attn"], strict=True)]
        diff_random = [a - b for a, b in zip(values["impact"], values["random"], strict=True)]
        compact.append(
            [
                "all" if block is None else block,
                *(lab.fmt(values[m], 2) for m in lab.BASE_METHODS),
                lab.fmt(diff_attn, 2),
                lab.fmt(diff_random, 2),
            ]
        )
    compact_table = markdown_table(
        ["block", "impact", "attn", "random", "impact − attn", "impact − random"], compact
    )
    text = (
        f"### {model} (dense top-1 {dense_top1:.1f}%)\n\n"
        f"Mean top-1 over the rates 10–90 %, mean ± s.e. over seeds (differences paired by "
        f"seed):\n\n{compact_table}\n\n"
        f"Top-1 (%) at each pruning rate, mean ± s.e. over seeds:\n\n{full}\n"
    )
    return text, summary


def main() -> None:
    args = parse_args()
    lab.set_single_thread()
    start = time.perf_counter()
    machine = describe_machine("cpu")
    lab.log(f"machine: {machine}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    models = lab.load_models(args.cache_dir)
    all_records, infos, sections, summary = [], {}, [], []
    for name, (model, model_info) in models.items():
        records, info = run_model(name, model, args.seeds, args.calib_size, args.cache_dir)
        infos[name] = {**model_info, **info}
        all_records += records
        depth = model.config.depth
        plot_fig7(records, name, depth, args.results_dir / f"single_block_fig7_{name}.png")
        plot_fig6(records, name, depth, args.results_dir / f"single_block_fig6_{name}.png")
        plot_all_blocks(records, name, depth, args.results_dir / f"single_block_all_{name}.png")
        text, rows = tables(records, name, depth, info["dense_top1"])
        sections.append(text)
        summary += rows
    seconds = time.perf_counter() - start
    computed = sum(info["pruned_forwards_run"] for info in infos.values())
    header = (
        "# Single-block pruning (paper Figs. 6-7) on the digits models\n\n"
        f"One block pruned, every other block dense (Eq. 2 with masks), no fine-tuning; "
        f"top-1 on the 1,000 held-out digits. Seeds {args.seeds} (calibration draw of "
        f"{args.calib_size} training digits + random scores). On {machine}; "
        f"{seconds / 60:.1f} min, {computed} pruned forward passes computed in this run "
        f"(the others read from the outcome memo of an earlier run in {args.cache_dir}).\n"
    )
    payload = {
        "machine": machine,
        "seeds": args.seeds,
        "calib_size": args.calib_size,
        "rates": list(lab.RATES),
        "models": infos,
        "seconds": round(seconds, 1),
        "summary": summary,
        "records": all_records,
    }
    lab.write_json(args.results_dir / "single_block_pruning.json", payload)
    path = args.results_dir / "single_block_pruning.md"
    path.write_text(header + "\n" + "\n".join(sections))
    lab.log(f"wrote {path}, .json and PNGs in {seconds / 60:.1f} min")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
