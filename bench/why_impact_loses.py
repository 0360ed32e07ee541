"""Why can impact scores (paper Eq. 13) lose to attn or random scores? Evidence on the two
digits models, with single-block pruning (one block pruned, all others dense, no tuning;
see ``pruning_lab`` and ``single_block_pruning.py``).

0. ``impact_scores`` against a brute-force Eq. 13 (every one of the H^(L−t+1) head paths,
   literal outer products) on tiny float64 models, in the original token order: the
   single-block chain, and random nested masks passed with ``order``; and Eq. 11 (sums
   inside the norm) against Eq. 12 (sums outside) for random dropped sets.
1. Calibration averaging: how stable the kept set is across calibration draws (Jaccard),
   and the library's mean of per-image scores against Eq. 13 applied to the mean maps
   and mean |Z| ("score of the mean") and against a mean of per-image normalised scores.
2. |Z| in Eq. 13: the scores with and without the absolute value.
3. Where the head reads: the class token's error at block L (before the final norm, the
   quantity Eq. 3 bounds), after the final norm, the logits (KL, top-1 agreement), and
   how well each predicts top-1.
4. The register lead (Darcet et al. 2023): background patches (all pixels ≈ 0) kept by
   each score, token norms by block, high-norm tokens, and the class token's attention
   mass on the tokens each score drops.
5. Variants of the score, evaluated like the baselines over seeds (not in the library).
6. Additivity at block 1: the error of dropping a set against the sum of the errors of
   dropping its tokens one at a time (measured on calibration images), and two scores
   built from those measurements (per-token oracle, set-aware superposition greedy).

Writes ``why_impact_loses.{md,json}`` to the results folder. Reuses the outcomes that
``single_block_pruning.py`` memoised in the cache folder when present.

    python bench/why_impact_loses.py [--seeds 0 1 2] [--calib-size 500]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import pruning_lab as lab
from common import RESULTS

from patchslim_ext.benchmark import describe_machine, markdown_table
from patchslim_ext.scoring import chain_diagonal, impact_scores, per_image_scores
from patchslim_ext.vit import VisionTransformer, ViTConfig

VARIANT_RATES = (30, 50, 70, 90)
PROBE_RATE = 50
# Scores evaluated by pruning (the others are only probed: kept sets, what they drop).
EVALUATED = (
    "impact",
    "attn",
    "random",
    "impact_of_mean",
    "impact_noabs",
    "impact_delta",
    "impact_lastcls",
    "chain_only",
    "lastcls_delta",
)
KEPT_GRID_RATE = 70  # the rate of the block-1 kept-set figure


# --------------------------------------------------------------------------- part 0


def _path_products(maps: list[Tensor], masks: list[Tensor], b: int) -> list[tuple[int, Tensor]]:
    """(h_t, A) for every head path: ``A = diag(m_L) P_L^{h_L} ⋯ diag(m_{t+1}) P_{t+1}^{h_{t+1}}``
    of image b (the identity when t = L)."""
    tokens = maps[0].shape[-1]
    head_ranges = [range(m.shape[1]) for m in maps]
    out = []
    for path in itertools.product(*head_ranges):
        product = torch.eye(tokens, dtype=torch.float64)
        for level, head in enumerate(path[1:], start=1):
            product = torch.diag(masks[level - 1].double()) @ maps[level][b, head] @ product
        out.append((path[0], product))
    return out


def brute_force_eq13(maps: list[Tensor], z_in: Tensor, masks: list[Tensor]) -> Tensor:
    """Eq. 13 literally, in the original token order, per image (B, N).

    ``maps[0]`` is block t's (B, H, N, N), ``maps[j]`` block t+j's full map and
    ``masks[j-1]`` its keep mask (N,). For every head path (h_t, h_{t+1}, …, h_L):
    ``A = diag(m_L) P_L^{h_L} ⋯ diag(m_{t+1}) P_{t+1}^{h_{t+1}}``, ``U = P_t^{h_t} |Z|``,
    and ``s_i += ‖A[:, i] U[i, :]‖_F²`` with the outer product formed explicitly.
    """
    batch, _, tokens, _ = maps[0].shape
    scores = torch.zeros(batch, tokens, dtype=torch.float64)
    for b in range(batch):
        for head, product in _path_products(maps, masks, b):
            u = maps[0][b, head] @ z_in[b].abs()
            for i in range(tokens):
                scores[b, i] += torch.outer(product[:, i], u[i]).square().sum()
    return scores


def brute_force_eq11(
    maps: list[Tensor], z_in: Tensor, masks: list[Tensor], dropped: Tensor
) -> Tensor:
    """Eq. 11 for the dropped set D, per image (B,): the sums over paths and over
    i ∈ D inside the norm, ``‖Σ_path Σ_{i∈D} A[:, i] U[i, :]‖_F²``."""
    batch, _, tokens, _ = maps[0].shape
    values = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        total = torch.zeros(tokens, z_in.shape[-1], dtype=torch.float64)
        for head, product in _path_products(maps, masks, b):
            u = maps[0][b, head] @ z_in[b].abs()
            for i in dropped.nonzero().flatten().tolist():
                total += torch.outer(product[:, i], u[i])
        values[b] = total.square().sum()
    return values


def verify_against_brute_force() -> tuple[list[dict[str, Any]], float]:
    """Max relative difference ``max|ours − brute| / max|brute|`` of ``impact_scores``
    on tiny random models (float64): every block t with the single-block chain, and with
    random nested masks above t given through ``order``.

    Also returns the smallest ratio Eq. 11 / Σ_{i∈D} Eq. 13 over random dropped sets D
    (half the patches) and images: Eq. 12 claims the ratio is at most 1."""
    results = []
    ratios = []
    for depth, heads in ((3, 2), (4, 2), (3, 3)):
        config = ViTConfig(
            img_size=12,
            patch_size=4,
            in_chans=1,
            num_classes=3,
            embed_dim=12,
            depth=depth,
            num_heads=heads,
        )
        torch.manual_seed(depth * 10 + heads)
        model = VisionTransformer(config).double().eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.5)  # far from uniform attention
        images = torch.randn(3, 1, 12, 12, dtype=torch.float64)
        run = lab.dense_run(model, images, keep_maps=True)
        tokens = config.num_tokens
        generator = torch.Generator().manual_seed(depth + heads)
        for block in range(depth):
            attn, keep_counts = lab.chain_inputs(run, block)
            ours = impact_scores(attn, run.tokens[block], keep_counts)
            masks = [torch.ones(tokens, dtype=torch.bool) for _ in range(block + 1, depth)]
            if masks:
                masks[-1] = torch.arange(tokens) == 0
            per_image = brute_force_eq13(run.maps[block:], run.tokens[block], masks)
            want = per_image.mean(0)
            results.append(_difference(depth, heads, block, "single-block chain", ours, want))
            dropped = torch.zeros(tokens, dtype=torch.bool)
            dropped[1:][torch.randperm(tokens - 1, generator=generator)[: (tokens - 1) // 2]] = True
            eq11 = brute_force_eq11(run.maps[block:], run.tokens[block], masks, dropped)
            ratios += (eq11 / per_image[:, dropped].sum(1)).tolist()
            if block == depth - 1:
                continue
            # Random nested masks in the original order: order π lists the tokens by
            # the deepest block keeping them; kept rows of block j's map list π[:n_j].
            order = torch.cat(
                [
                    torch.zeros(1, dtype=torch.long),
                    torch.randperm(tokens - 1, generator=generator) + 1,
                ]
            )
            counts = sorted(
                torch.randint(1, tokens + 1, (depth - block - 1,), generator=generator).tolist(),
                reverse=True,
            )
            counts[-1] = 1  # the last block keeps the class token (order[0] = 0)
            masks = []
            for n in counts:
                mask = torch.zeros(tokens, dtype=torch.bool)
                mask[order[:n]] = True
                masks.append(mask)
            kept_maps = [run.maps[block]] + [
                run.maps[j][:, :, order[:n]]
                for j, n in zip(range(block + 1, depth), counts, strict=True)
            ]
            ours = impact_scores(kept_maps, run.tokens[block], counts, order)
            want = brute_force_eq13(run.maps[block:], run.tokens[block], masks).mean(0)
            results.append(
                _difference(depth, heads, block, f"nested masks {counts}, order", ours, want)
            )
    return results, min(ratios)


def _difference(
    depth: int, heads: int, block: int, case: str, ours: Tensor, want: Tensor
) -> dict[str, Any]:
    return {
        "depth": depth,
        "heads": heads,
        "block": block + 1,
        "case": case,
        "max_rel_diff": float((ours - want).abs().max() / want.abs().max()),
    }


# --------------------------------------------------------------------------- scores


def per_image_pieces(run: lab.DenseRun, block: int) -> dict[str, Tensor]:
    """Per-image factors of Eq. 13 for ``block`` (each (B, N), float64):
    ``chain`` = diag(S_t), ``u`` = Σ_h ‖(P_t^h |Z|)[i]‖², ``u_signed`` the same without
    the absolute value, ``delta`` = ‖Z_t[i] − Z_{t−1}[i]‖² (the update that pruning token
    i at block t removes), ``last_cls`` = Σ_h P_L^h[0, i]² (the last block's class row)."""
    attn, _ = lab.chain_inputs(run, block)
    attn = [maps.double() for maps in attn]
    z_in = run.tokens[block].double()
    batch, tokens = z_in.shape[:2]
    chain = z_in.new_ones(batch, tokens) if len(attn) == 1 else chain_diagonal(attn[1:])
    maps = attn[0]
    depth = run.depth
    last = run.maps[depth - 1][:, :, 0].double().square().sum(1)
    return {
        "chain": chain,
        "u": (maps @ z_in.abs()[:, None]).square().sum((1, 3)),
        "u_signed": (maps @ z_in[:, None]).square().sum((1, 3)),
        "delta": (run.tokens[block + 1].double() - z_in).square().sum(-1),
        "last_cls": last if block < depth - 1 else z_in.new_ones(batch, tokens),
    }


def score_of_mean(run: lab.DenseRun, block: int) -> Tensor:
    """Eq. 13 on the calibration-mean maps and the mean |Z_{t−1}| (one "mean image")."""
    attn, keep_counts = lab.chain_inputs(run, block)
    mean_maps = [maps.double().mean(0, keepdim=True) for maps in attn]
    mean_abs = run.tokens[block].double().abs().mean(0, keepdim=True)
    return per_image_scores(mean_maps, mean_abs, keep_counts)[0]


def normalised_mean(per_image: Tensor) -> Tensor:
    """Mean over images of each image's scores divided by their sum."""
    return (per_image / per_image.sum(1, keepdim=True)).mean(0)


VARIANTS: dict[str, tuple[str, Callable[[dict[str, Tensor]], Tensor]]] = {
    # name: (formula, per-image (B, N) scores from the pieces; averaged over images)
    "impact_noabs": (
        "diag(S_t)_i · Σ_h ‖(P_t^h Z_{t−1})[i]‖²",
        lambda p: p["chain"] * p["u_signed"],
    ),
    "impact_delta": ("diag(S_t)_i · ‖Z_t[i] − Z_{t−1}[i]‖²", lambda p: p["chain"] * p["delta"]),
    "impact_lastcls": (
        "Σ_h P_L^h[0, i]² · Σ_h ‖(P_t^h |Z_{t−1}|)[i]‖²",
        lambda p: p["last_cls"] * p["u"],
    ),
    "chain_only": ("diag(S_t)_i", lambda p: p["chain"]),
    "lastcls_delta": (
        "Σ_h P_L^h[0, i]² · ‖Z_t[i] − Z_{t−1}[i]‖²",
        lambda p: p["last_cls"] * p["delta"],
    ),
}
EXTRA_VARIANTS = {
    "impact_of_mean": "Eq. 13 on the calibration-mean maps and mean |Z_{t−1}|",
    "impact_normavg": "mean over images of s_i / Σ_j s_j (per-image Eq. 13 normalised)",
}


def all_scores(run: lab.DenseRun, block: int, seed: int) -> dict[str, Tensor]:
    """Every score of ``block`` (N,) from one calibration run: the baselines (library) and
    the variants."""
    scores = {method: lab.library_scores(run, block, method, seed) for method in lab.BASE_METHODS}
    pieces = per_image_pieces(run, block)
    impact_per_image = pieces["chain"] * pieces["u"]
    # The pieces recompute the library's impact scores (a consistency check).
    mine = impact_per_image.mean(0)
    difference = float((mine - scores["impact"]).abs().max() / scores["impact"].abs().max())
    if difference > 1e-4:
        raise AssertionError(f"per-image pieces disagree with impact_scores: {difference:.2e}")
    scores["impact_of_mean"] = score_of_mean(run, block)
    scores["impact_normavg"] = normalised_mean(impact_per_image)
    for name, (_, formula) in VARIANTS.items():
        scores[name] = formula(pieces).mean(0)
    return scores


# --------------------------------------------------------------------------- analysis


def spearman(x: list[float], y: list[float]) -> float:
    rx = torch.tensor(x).argsort().argsort().double()
    ry = torch.tensor(y).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def token_norm_table(
    model_name: str, evaluator: lab.SingleBlockEvaluator, background: Tensor
) -> dict:
    """Per block output: mean norms of the class token, foreground and background
    patches, the max/median norm ratio, and how often the highest-norm patch is
    background."""
    rows = []
    for block in range(evaluator.run.depth):
        z = evaluator.run.tokens[block + 1]
        norms = z.norm(dim=-1)
        patches = norms[:, 1:]
        top = patches.argmax(1)
        rows.append(
            {
                "model": model_name,
                "block": block + 1,
                "cls": float(norms[:, 0].mean()),
                "foreground": float(patches[~background].mean()),
                "background": float(patches[background].mean()),
                "max_over_median": float((patches.max(1).values / patches.median(1).values).mean()),
                "top_norm_is_background": float(background.gather(1, top[:, None]).double().mean()),
            }
        )
    return {"rows": rows}


def probe_mask(
    evaluator: lab.SingleBlockEvaluator, block: int, mask: Tensor, background: Tensor
) -> dict[str, float]:
    """What a mask drops (test set, dense model): background share, norms, the class
    token's attention mass on the dropped tokens in the last block and in blocks
    block+1 … L (mean over heads and images)."""
    run = evaluator.run
    dropped = ~mask
    patch_dropped = dropped[1:]
    bg = background.double()
    fg = (~background).double()
    kept_patch = mask[1:].double()
    z_out = run.tokens[block + 1].norm(dim=-1)[:, 1:]
    mean_norm = float(z_out.mean())
    above = range(block + 1, run.depth)
    masses = [float(run.cls_maps[j][..., dropped].sum(-1).mean()) for j in above]
    return {
        "background_kept": float((bg * kept_patch).sum() / bg.sum()),
        "foreground_kept": float((fg * kept_patch).sum() / fg.sum()),
        "dropped_norm_rel": float(z_out[:, patch_dropped].mean()) / mean_norm,
        "kept_norm_rel": float(z_out[:, ~patch_dropped].mean()) / mean_norm,
        "cls_mass_last": float(run.cls_maps[-1][..., dropped].sum(-1).mean()),
        "cls_mass_above": sum(masses) / len(masses) if masses else 0.0,
        "dropped_share": float(patch_dropped.double().mean()),
    }


def cls_attention_to_background(evaluator: lab.SingleBlockEvaluator, background: Tensor) -> list:
    """Share of the class token's attention (mean over heads) on background patches,
    per block, against the background share of the patches."""
    shares = []
    for maps in evaluator.run.cls_maps:
        mass = maps.mean(1)[:, 1:]
        shares.append(float((mass * background).sum(1).mean()))
    return shares


def run_model(
    name: str, model: VisionTransformer, seeds: list[int], calib_size: int, cache_dir: Path
) -> dict[str, Any]:
    images, labels = lab.held_out_digits()
    timer = lab.Timer()
    with timer("dense"):
        evaluator = lab.SingleBlockEvaluator(model, images, labels)
    memo = cache_dir / f"outcomes_{name}.json"
    evaluator.load_memo(memo)
    background = lab.background_patches(images, model.config.patch_size)
    depth = model.config.depth
    kept: dict[tuple[str, int, int], Tensor] = {}  # (method, block, seed) -> mask at 50 %
    records, probes, spreads = [], [], []
    first_block: dict[str, Any] = {}
    for seed in seeds:
        with timer("calibration"):
            run = lab.dense_run(model, lab.calibration_images(seed, calib_size), keep_maps=True)
        for block in range(depth):
            with timer("scores"):
                scores = all_scores(run, block, seed)
                pieces = per_image_pieces(run, block)
            spreads.append(
                {"seed": seed, "block": block + 1}
                | {
                    key: coefficient_of_variation(pieces[key].mean(0)[1:])
                    for key in ("u", "chain", "delta")
                }
            )
            if block == 0 and seed == seeds[0]:
                first_block = {
                    "scores": {method: values.tolist() for method, values in scores.items()},
                    "factors": {
                        key: pieces[key].mean(0).tolist() for key in ("u", "chain", "delta")
                    },
                }
            for method, values in scores.items():
                kept[method, block, seed] = lab.keep_mask(values, PROBE_RATE)
                probe = probe_mask(evaluator, block, kept[method, block, seed], background)
                probes.append(
                    {"model": name, "seed": seed, "block": block + 1, "method": method, **probe}
                )
                for rate in VARIANT_RATES if method in EVALUATED else ():
                    with timer("evaluation"):
                        outcome = evaluator.outcome(block, lab.keep_mask(values, rate))
                    records.append(outcome.record(name, seed, block, method, rate))
        evaluator.save_memo(memo)
        lab.log(f"{name}: seed {seed} done ({evaluator.runs} new pruned forwards)")
    with timer("additivity"):
        additive = additivity(name, model, seeds, calib_size, evaluator)
    evaluator.save_memo(memo)
    methods = list(scores)
    stability = []
    for method in methods:
        for block in range(depth):
            overlaps = [
                lab.jaccard(kept[method, block, a], kept[method, block, b])
                for a, b in lab.pairs(seeds)
            ]
            versus_impact = [
                lab.jaccard(kept[method, block, s], kept["impact", block, s]) for s in seeds
            ]
            stability.append(
                {
                    "model": name,
                    "method": method,
                    "block": block + 1,
                    "jaccard_across_seeds": sum(overlaps) / len(overlaps),
                    "jaccard_with_impact": sum(versus_impact) / len(versus_impact),
                }
            )
    return {
        "records": records,
        "probes": probes,
        "stability": stability,
        "norms": token_norm_table(name, evaluator, background)["rows"],
        "cls_attention_to_background": cls_attention_to_background(evaluator, background),
        "background_share": float(background.double().mean()),
        "dense_top1": 100.0 * float((evaluator.run.logits.argmax(-1) == labels).double().mean()),
        "additivity": additive,
        "spreads": spreads,
        "first_block": first_block,
        "background_frequency": background.double().mean(0).tolist(),
        "seconds": timer.seconds,
        "pruned_forwards_run": evaluator.runs,
    }


def coefficient_of_variation(values: Tensor) -> float:
    """Standard deviation / mean of a score over the patches."""
    return float(values.std() / values.mean())


# --------------------------------------------------------------------------- part 6

ORACLE_IMAGES = 250  # calibration images of the single-token measurements


@torch.no_grad()
def single_token_effects(
    model: VisionTransformer, images: Tensor, block: int
) -> tuple[lab.SingleBlockEvaluator, Tensor]:
    """The class-token change (N, B, C) at block L when ONLY token i is dropped at
    ``block`` (row 0, the class token, is zero), measured on ``images``; with the
    evaluator of those images."""
    evaluator = lab.SingleBlockEvaluator(model, images, torch.zeros(images.shape[0]))
    tokens = model.config.num_tokens
    effects = torch.zeros(tokens, *evaluator.dense_cls.shape, dtype=torch.float64)
    for i in range(1, tokens):
        mask = torch.ones(tokens, dtype=torch.bool)
        mask[i] = False
        effects[i] = (evaluator.pruned_cls(block, mask) - evaluator.dense_cls).double()
    return evaluator, effects


def superposition_greedy(effects: Tensor) -> Tensor:
    """Scores (N,) from a set-aware greedy: drop, one at a time, the patch whose
    single-token change added to the changes of those already dropped gives the
    smallest ``‖Σ_{i∈D} δ_i‖²`` (linear superposition of the single-token effects);
    patches dropped later score higher."""
    tokens = effects.shape[0]
    remaining = list(range(1, tokens))
    total = torch.zeros_like(effects[0])
    scores = torch.full((tokens,), float(tokens), dtype=torch.float64)
    for rank in range(tokens - 1):
        costs = (total[None] + effects[remaining]).square().sum((1, 2))
        chosen = remaining.pop(int(costs.argmin()))
        total += effects[chosen]
        scores[chosen] = rank
    return scores


def additivity(
    name: str,
    model: VisionTransformer,
    seeds: list[int],
    calib_size: int,
    test: lab.SingleBlockEvaluator,
    block: int = 0,
) -> dict[str, Any]:
    """Is the class-token error of a dropped set the sum of its tokens' errors? Measured
    on calibration images at ``block`` for each score's dropped set; plus two scores
    built from the measured single-token effects (``oracle_single``: each token's own
    error; ``superposition``: the set-aware greedy), evaluated on the test set."""
    rows, records = [], []
    measured: dict[str, list[float]] = {}
    for seed in seeds:
        calib = lab.calibration_images(seed, calib_size)
        run = lab.dense_run(model, calib, keep_maps=True)
        scores = {
            method: lab.library_scores(run, block, method, seed) for method in lab.BASE_METHODS
        }
        evaluator, effects = single_token_effects(model, calib[:ORACLE_IMAGES], block)
        energy = float(evaluator.dense_cls.double().square().sum())
        single = effects.square().sum((1, 2)) / energy
        scores["oracle_single"] = torch.where(torch.arange(single.shape[0]) == 0, 1e9, single)
        scores["superposition"] = superposition_greedy(effects)
        if seed == seeds[0]:
            measured = {key: scores[key].tolist() for key in ("oracle_single", "superposition")}
        for method, values in scores.items():
            for rate in VARIANT_RATES:
                mask = lab.keep_mask(values, rate)
                dropped = ~mask
                actual = evaluator.outcome(block, mask).cls_error
                rows.append(
                    {
                        "model": name,
                        "seed": seed,
                        "method": method,
                        "rate": rate,
                        "actual": actual,
                        "sum_of_single": float(single[dropped].sum()),
                        "superposed": float(effects[dropped].sum(0).square().sum()) / energy,
                    }
                )
                if method in ("oracle_single", "superposition"):
                    outcome = test.outcome(block, mask)
                    records.append(outcome.record(name, seed, block, method, rate))
        lab.log(f"{name}: additivity, seed {seed} done")
    return {"rows": rows, "records": records, "first_seed_scores": measured}


def report_additivity(name: str, result: dict[str, Any], seeds: list[int]) -> str:
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in result["additivity"]["rows"]))
    records = result["records"] + result["additivity"]["records"]
    for method in methods:
        for rate in VARIANT_RATES:
            at = _select(result["additivity"]["rows"], method=method, rate=rate)
            top1 = [r["top1"] for r in _select(records, method=method, rate=rate, block=1)]
            rows.append(
                [
                    method,
                    rate,
                    lab.fmt([r["actual"] for r in at], 4),
                    lab.fmt([r["sum_of_single"] for r in at], 4),
                    lab.fmt([r["actual"] / r["sum_of_single"] for r in at], 2),
                    lab.fmt([r["superposed"] / r["actual"] for r in at], 2),
                    lab.fmt(top1, 1),
                ]
            )
    return (
        f"\nAdditivity at block 1 ({name}): the class-token error (relative, at block L) of "
        f"each score's dropped set D, measured on {ORACLE_IMAGES} calibration images, against "
        "the sum of the errors of dropping each i ∈ D alone, and against the error the "
        "superposed single-token changes ‖Σ_{i∈D} δ_i‖² predict; last column: test top-1 "
        "with block 1 pruned (mean ± s.e. over seeds):\n\n"
        + markdown_table(
            [
                "score",
                "rate %",
                "E(D)",
                "Σ_{i∈D} E({i})",
                "E(D) / Σ",
                "superposed / E(D)",
                "test top-1",
            ],
            rows,
        )
        + "\n"
    )


def plot_block1(name: str, result: dict[str, Any], seed: int, path: Path) -> None:
    """Block 1 on the 7×7 patch grid: the background frequency, the calibration-mean
    factors of Eq. 13 (u = Σ_h ‖P_t^h|Z|‖², diag(S_t)) and ‖ΔZ‖², and the patches each
    score keeps at KEPT_GRID_RATE % (first seed)."""
    scores = result["first_block"]["scores"] | result["additivity"]["first_seed_scores"]
    factors = result["first_block"]["factors"]
    grid = math.isqrt(len(result["background_frequency"]))
    panels: list[tuple[str, Tensor]] = [
        ("background frequency", torch.tensor(result["background_frequency"]))
    ]
    panels += [
        (title, torch.tensor(factors[key][1:]))
        for key, title in (
            ("u", "u = Σ_h‖(P|Z|)_i‖²"),
            ("chain", "diag(S_t)"),
            ("delta", "‖ΔZ_i‖²"),
        )
    ]
    for method in ("impact", "attn", "random", "impact_delta", "impact_lastcls", "superposition"):
        kept = lab.keep_mask(torch.tensor(scores[method]), KEPT_GRID_RATE)[1:]
        panels.append((f"{method}: kept", kept.double()))
    figure, axes = plt.subplots(2, 5, figsize=(13, 5.6))
    for axis, (title, values) in zip(axes.flat, panels, strict=False):
        image = axis.imshow(values.view(grid, grid), cmap="viridis")
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        if "kept" not in title:
            figure.colorbar(image, ax=axis, fraction=0.046)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(
        f"{name}, block 1: Eq. 13's factors (calibration means) and the patches each score "
        f"keeps at {KEPT_GRID_RATE} % pruning (yellow = kept; seed {seed})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report_spreads(result: dict[str, Any], depth: int) -> str:
    rows = []
    for block in range(1, depth):
        at = [r for r in result["spreads"] if r["block"] == block]
        rows.append([block, *(lab.fmt([r[key] for r in at], 2) for key in ("u", "chain", "delta"))])
    return (
        "\nSpread over the patches (coefficient of variation, s.d./mean, of the calibration "
        "means; mean ± s.e. over seeds) of Eq. 13's two factors and of the actual update "
        "‖Z_t[i] − Z_{t−1}[i]‖²: the score's ranking is the ranking of diag(S_t) when u is "
        "nearly flat:\n\n"
        + markdown_table(["block", "u = Σ_h ‖(P_t^h|Z|)_i‖²", "diag(S_t)", "‖ΔZ_i‖²"], rows)
        + "\n"
    )


# --------------------------------------------------------------------------- report


def _select(rows: list[dict], **where: Any) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _per_seed_mean(rows: list[dict], key: str, seeds: list[int], **where: Any) -> list[float]:
    out = []
    for seed in seeds:
        values = [r[key] for r in _select(rows, seed=seed, **where)]
        out.append(sum(values) / len(values))
    return out


def report_model(name: str, result: dict[str, Any], seeds: list[int], depth: int) -> str:
    records, probes = result["records"], result["probes"]
    methods = list(dict.fromkeys(r["method"] for r in records))
    lines = [f"### {name} (dense top-1 {result['dense_top1']:.1f}%)\n"]

    # Variants: mean top-1 over blocks and rates, paired difference with impact.
    rows = []
    for method in methods:
        top1 = [
            sum(values) / len(values)
            for values in (
                [r["top1"] for r in _select(records, seed=s, method=method)] for s in seeds
            )
        ]
        impact = [
            sum(values) / len(values)
            for values in (
                [r["top1"] for r in _select(records, seed=s, method="impact")] for s in seeds
            )
        ]
        first = _per_seed_mean(records, "top1", seeds, method=method, block=1)
        first_impact = _per_seed_mean(records, "top1", seeds, method="impact", block=1)
        rows.append(
            [
                method,
                lab.fmt(top1, 2),
                lab.fmt([a - b for a, b in zip(top1, impact, strict=True)], 2),
                lab.fmt(first, 2),
                lab.fmt([a - b for a, b in zip(first, first_impact, strict=True)], 2),
                ", ".join(f"{a - b:+.2f}" for a, b in zip(top1, impact, strict=True)),
            ]
        )
    lines.append(
        f"Top-1 (%) averaged over all {depth} blocks and the rates {list(VARIANT_RATES)} %, "
        "mean ± s.e. over seeds; differences paired by seed:\n\n"
        + markdown_table(
            [
                "score",
                "top-1 (all blocks)",
                "− impact",
                "top-1 (block 1)",
                "− impact (block 1)",
                "per-seed − impact",
            ],
            rows,
        )
    )

    # Where the head reads: errors at the probe rate, per score, mean over blocks < L.
    rows = []
    probe_records = [r for r in records if r["rate"] == PROBE_RATE and r["block"] < depth]
    for method in methods:
        chosen = _select(probe_records, method=method)
        rows.append(
            [method]
            + [
                f"{sum(r[key] for r in chosen) / len(chosen):.4g}"
                for key in ("cls_error", "normed_error", "logit_error", "kl", "agreement", "top1")
            ]
        )
    lines.append(
        f"\nErrors when one block (1 … {depth - 1}) is pruned at {PROBE_RATE} %, mean over "
        "blocks and seeds (relative squared errors of the class token before and after "
        "the final norm and of the logits; KL(dense ‖ pruned); top-1 agreement with the "
        "dense model, %):\n\n"
        + markdown_table(
            ["score", "cls error (block L)", "after norm", "logits", "KL", "agreement", "top-1"],
            rows,
        )
    )
    # Which error predicts the accuracy loss? Spearman over (block, score, seed, rate).
    scored = [r for r in records if r["block"] < depth]
    drop = [result["dense_top1"] - r["top1"] for r in scored]
    correlations = [
        [key, f"{spearman([r[key] for r in scored], drop):.3f}"]
        for key in ("cls_error", "normed_error", "logit_error", "kl")
    ]
    correlations.append(
        ["100 − agreement", f"{spearman([-r['agreement'] for r in scored], drop):.3f}"]
    )
    lines.append(
        "\nSpearman correlation of each error with the top-1 loss over every (block < L, "
        f"score, seed, rate) configuration ({len(scored)}):\n\n"
        + markdown_table(["error", "Spearman ρ with top-1 loss"], correlations)
    )
    # Per block: which score has the smallest class-token error and the highest top-1?
    rows = []
    for block in range(1, depth):
        at = [r for r in probe_records if r["block"] == block]
        err = {m: sum(r["cls_error"] for r in _select(at, method=m)) for m in lab.BASE_METHODS}
        acc = {
            m: sum(r["top1"] for r in _select(at, method=m)) / len(seeds) for m in lab.BASE_METHODS
        }
        rows.append(
            [
                block,
                min(err, key=err.get),
                max(acc, key=acc.get),
                ", ".join(f"{m} {acc[m]:.1f}" for m in lab.BASE_METHODS),
            ]
        )
    lines.append(
        f"\nPer block at {PROBE_RATE} % (baselines): the score with the smallest class-token "
        "error at block L and the one with the best top-1 (mean over seeds):\n\n"
        + markdown_table(["block", "smallest cls error", "best top-1", "top-1 per score"], rows)
    )

    # Register lead.
    rows = []
    probed = list(dict.fromkeys(p["method"] for p in probes))
    for method, scope in itertools.product(probed, ("all", "block 1")):
        chosen = [
            p
            for p in probes
            if p["method"] == method and p["block"] < depth and (scope == "all" or p["block"] == 1)
        ]
        rows.append(
            [method, f"1 … {depth - 1}" if scope == "all" else "1"]
            + [
                f"{sum(p[key] for p in chosen) / len(chosen):.3f}"
                for key in (
                    "background_kept",
                    "foreground_kept",
                    "dropped_norm_rel",
                    "kept_norm_rel",
                    "cls_mass_last",
                    "cls_mass_above",
                )
            ]
        )
    lines.append(
        f"\nWhat each score drops at {PROBE_RATE} % (mean over the blocks named and "
        "seeds; test set, dense activations): share of background / foreground patches kept, "
        "mean norm (at the pruned block's output) of dropped and kept patches relative to "
        "all patches, and the class token's attention mass on the dropped tokens in the "
        "last block and averaged over the blocks above the pruned one (random: ≈ the "
        f"dropped share):\n\n"
        + markdown_table(
            [
                "score",
                "blocks",
                "bg kept",
                "fg kept",
                "dropped norm",
                "kept norm",
                "cls mass (L)",
                "cls mass (above)",
            ],
            rows,
        )
    )
    norm_rows = [
        [
            r["block"],
            f"{r['cls']:.1f}",
            f"{r['foreground']:.1f}",
            f"{r['background']:.1f}",
            f"{r['max_over_median']:.2f}",
            f"{r['top_norm_is_background']:.2f}",
            f"{result['cls_attention_to_background'][r['block'] - 1]:.2f}",
        ]
        for r in result["norms"]
    ]
    lines.append(
        f"\nToken norms by block output (test set; background = {result['background_share']:.2f} "
        "of the patches), the mean per-image max/median patch-norm ratio, how often the "
        "highest-norm patch is background, and the class token's attention share on "
        "background patches:\n\n"
        + markdown_table(
            ["block", "‖cls‖", "‖fg‖", "‖bg‖", "max/median", "top-norm is bg", "cls attn on bg"],
            norm_rows,
        )
    )
    # Stability.
    rows = []
    for method in probed:
        chosen = [s for s in result["stability"] if s["method"] == method and s["block"] < depth]
        rows.append(
            [
                method,
                f"{sum(s['jaccard_across_seeds'] for s in chosen) / len(chosen):.3f}",
                f"{min(s['jaccard_across_seeds'] for s in chosen):.3f}",
                f"{sum(s['jaccard_with_impact'] for s in chosen) / len(chosen):.3f}",
            ]
        )
    lines.append(
        f"\nKept sets at {PROBE_RATE} % across calibration draws (Jaccard, mean and min over "
        "blocks of the mean over seed pairs) and overlap with impact's kept set:\n\n"
        + markdown_table(
            ["score", "Jaccard across seeds", "min over blocks", "Jaccard with impact"], rows
        )
    )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/fig67"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calib-size", type=int, default=500)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    lab.set_single_thread()
    start = time.perf_counter()
    machine = describe_machine("cpu")
    lab.log(f"machine: {machine}")
    verification, eq11_ratio = verify_against_brute_force()
    worst = max(v["max_rel_diff"] for v in verification)
    lab.log(f"impact_scores vs brute-force Eq. 13: max relative difference {worst:.2e}")
    lab.log(f"min Eq. 11 / Σ Eq. 13 over random dropped sets: {eq11_ratio:.3f}")
    models = lab.load_models(args.cache_dir)
    results, sections = {}, []
    for name, (model, _) in models.items():
        results[name] = run_model(name, model, args.seeds, args.calib_size, args.cache_dir)
        sections.append(report_model(name, results[name], args.seeds, model.config.depth))
        sections.append(report_spreads(results[name], model.config.depth))
        sections.append(report_additivity(name, results[name], args.seeds))
        figure = args.results_dir / f"why_block1_{name}.png"
        plot_block1(name, results[name], args.seeds[0], figure)
        sections.append(f"\n![block 1 of {name}]({figure.name})\n")
    seconds = time.perf_counter() - start
    formulas = [[name, formula] for name, (formula, _) in VARIANTS.items()]
    formulas += [[name, formula] for name, formula in EXTRA_VARIANTS.items()]
    verification_rows = [
        [v["depth"], v["heads"], v["block"], v["case"], f"{v['max_rel_diff']:.1e}"]
        for v in verification
    ]
    text = (
        "# Why impact scores can lose: evidence on the digits models\n\n"
        f"Single-block pruning (one block pruned, all others dense, no tuning), seeds "
        f"{args.seeds}, calibration {args.calib_size} training digits, test: the 1,000 "
        f"held-out digits. On {machine}; {seconds / 60:.1f} min, "
        f"{sum(r['pruned_forwards_run'] for r in results.values())} test-set pruned forward "
        "passes computed in this run (the others read from the outcome memo that "
        f"single_block_pruning.py and earlier runs left in {args.cache_dir}).\n\n"
        "## 0. impact_scores against brute-force Eq. 13\n\n"
        f"Max relative difference {worst:.1e} (float64, tiny random models, every head "
        "path enumerated):\n\n"
        + markdown_table(["blocks", "heads", "block t", "case", "max rel. diff"], verification_rows)
        + "\n\nEq. 12 is not an upper bound of Eq. 11: on the same tiny models, for random "
        "dropped sets D (half the patches), Eq. 11's ‖Σ_path Σ_{i∈D} A[:, i] U[i, :]‖² is at "
        f"least {eq11_ratio:.2f} × Σ_{{i∈D}} s_i (the smallest ratio over sets and images); "
        "with P ≥ 0 and |Z| ≥ 0 every cross term is ≥ 0, so the ratio is ≥ 1 always."
        + "\n\n## Score variants\n\n"
        + markdown_table(
            ["name", "per-image score, averaged over the calibration images"],
            [
                ["impact", "diag(S_t)_i · Σ_h ‖(P_t^h |Z_{t−1}|)[i]‖² (library)"],
                ["attn", "Σ_h ‖P_t^h[i, :]‖² (library)"],
                ["random", "uniform"],
                *formulas,
            ],
        )
        + "\n\n## Results\n\n"
        + "\n".join(sections)
    )
    payload = {
        "machine": machine,
        "seeds": args.seeds,
        "calib_size": args.calib_size,
        "variant_rates": list(VARIANT_RATES),
        "probe_rate": PROBE_RATE,
        "verification": verification,
        "min_eq11_over_eq12": eq11_ratio,
        "seconds": round(seconds, 1),
        "models": results,
    }
    lab.write_json(args.results_dir / "why_impact_loses.json", payload)
    path = args.results_dir / "why_impact_loses.md"
    path.write_text(text)
    lab.log(f"wrote {path} and .json in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
