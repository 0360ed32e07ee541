"""The acceleration-report harness (patchslim bench): plans, baseline, timing fields."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import patchslim_ext as ps
from patchslim_ext.benchmark import (
    PAPER_FLOP_REDUCTION,
    compare,
    median_forward_seconds,
    peak_memory_bytes,
    pyramid_plan,
    table_row,
    torch_slimmed_forward,
)
from patchslim_ext.cli import main
from patchslim_ext.vit import MODEL_FACTORIES


@pytest.mark.parametrize("name", sorted(PAPER_FLOP_REDUCTION))
def test_pyramid_plans_match_the_paper(name):
    config = MODEL_FACTORIES[name]().config
    plan = pyramid_plan(config, PAPER_FLOP_REDUCTION[name])
    reduction = 1 - ps.flops_of(config, plan.keep_counts) / ps.flops_of(config)
    assert abs(reduction - PAPER_FLOP_REDUCTION[name]) < 0.0005  # the paper's 0.1% rounding
    counts = plan.keep_counts
    assert counts[0] == config.num_tokens and counts[-1] == 1
    assert list(counts) == sorted(counts, reverse=True)  # a pyramid


def test_unreachable_reduction_is_refused():
    with pytest.raises(ValueError, match="out of reach"):
        pyramid_plan(ps.digits_vit().config, 0.99)


def test_torch_baseline_computes_the_slimmed_model():
    torch.manual_seed(0)
    model = ps.digits_vit().eval()
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(49) + 1])
    plan = ps.SlimPlan(order, [50, 44, 40, 33, 30, 21, 18, 12, 9, 5, 2, 1])
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            torch_slimmed_forward(model, plan, images), copy.deepcopy(model).set_plan(plan)(images),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_compare_row_is_consistent():
    torch.manual_seed(0)
    model = ps.digits_vit()
    plan = pyramid_plan(model.config, 0.45)
    row = compare("digits_vit", model, plan, batch=4, repeats=3)
    assert row.dense_flops == ps.flops_of(model.config)
    assert row.slim_flops == ps.flops_of(model.config, plan.keep_counts)
    assert row.dense_ms > 0 and row.slim_ms > 0 and row.torch_slim_ms > 0
    assert row.dense_peak_mb > 0 and row.slim_peak_mb > 0
    record = row.to_dict()
    assert record["ratio"] == pytest.approx(record["time_reduction"] / record["flop_reduction"])
    assert len(table_row(row)) == 12


def test_peak_memory_counts_the_live_intermediates():
    weight = torch.randn(256, 256)
    # Two live 1024x256 float32 results (1 MiB each) at the peak.
    peak = peak_memory_bytes(lambda x: (x @ weight) + (x @ weight).sum(), torch.randn(1024, 256))
    assert 2 * 2**20 <= peak <= 2.1 * 2**20


def test_median_rotates_inputs():
    seen = []
    batches = [torch.full((1,), float(i)) for i in range(3)]
    median_forward_seconds(lambda x: seen.append(int(x.item())), batches, repeats=6, warmup=0)
    assert seen == [0, 1, 2, 0, 1, 2]


def test_bench_command(tmp_path, capsys):
    args = ["bench", "--models", "deit_tiny_patch16_224", "--batch", "1", "--repeats", "2"]
    assert main([*args, "--json", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    (row,) = summary["rows"]
    assert row["model"] == "deit_tiny_patch16_224" and row["batch"] == 1
    assert row["flop_reduction"] == pytest.approx(0.462, abs=5e-4)
    assert (tmp_path / "bench.md").read_text().count("deit_tiny_patch16_224") == 1
