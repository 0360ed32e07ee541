"""FLOP counts: fvcore handles, the paper's baselines, and the analytic formula."""

from __future__ import annotations

import logging

import pytest
import torch

import patchslim_ext as ps
from patchslim_ext.flops import block_flops, flop_analysis

PAPER_BASELINES = {
    ps.deit_tiny_patch16_224: 1.25e9,
    ps.deit_small_patch16_224: 4.60e9,
    ps.deit_base_patch16_224: 17.56e9,
}


@pytest.mark.parametrize("factory", list(PAPER_BASELINES), ids=lambda f: f.__name__)
def test_deit_flops_match_the_paper(factory, caplog):
    model = factory().eval()
    images = torch.randn(1, 3, 224, 224)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        analysis = flop_analysis(model, (images,))
        total = analysis.total()
    assert abs(total - PAPER_BASELINES[factory]) <= 0.01 * PAPER_BASELINES[factory]
    assert total == ps.flops_of(model.config)
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    assert "unsupported" not in caplog.text.lower()
    assert "never called" not in caplog.text


def test_fvcore_and_analytic_agree_per_block_and_batch():
    config = ps.digits_vit().config
    model = ps.digits_vit().eval()
    with torch.no_grad():
        analysis = flop_analysis(model, (torch.randn(3, 1, 28, 28),))
        by_module = analysis.by_module()
    for block in range(config.depth):
        assert by_module[f"blocks.{block}"] == 3 * block_flops(config, config.num_tokens)
    assert analysis.total() == ps.flops_of(config, batch_size=3)
    assert ps.count_flops(model, (torch.randn(3, 1, 28, 28),)) == analysis.total()


def test_handles_count_attention_and_layer_norms():
    model = ps.digits_vit().eval()
    with torch.no_grad():
        by_op = flop_analysis(model, (torch.randn(1, 1, 28, 28),)).by_operator()
    config = model.config
    n, c = config.num_tokens, config.embed_dim
    assert by_op["scaled_dot_product_attention"] == config.depth * 2 * n * n * c
    # Two per block on every token, and the final one on the class token only.
    assert by_op["layer_norm"] == config.depth * 2 * 5 * n * c + 5 * c


# The T2T-ViT authors' figures: 4.8 GFLOPs with performer token layers (t2t_vit_14), 6.1
# with transformer ones; the Patch Slimming paper's Table 1 lists 5.2 for T2T-ViT-14.
T2T_AUTHORS_GFLOPS = {ps.t2t_vit_14: 4.8, ps.t2t_vit_t_14: 6.1}


@pytest.mark.parametrize("factory", list(T2T_AUTHORS_GFLOPS), ids=lambda f: f.__name__)
def test_t2t_vit_14_flops_match_its_authors(factory, caplog):
    model = factory().eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        analysis = flop_analysis(model, (torch.randn(1, 3, 224, 224),))
        total = analysis.total()
    assert abs(total / 1e9 - T2T_AUTHORS_GFLOPS[factory]) <= 0.02 * T2T_AUTHORS_GFLOPS[factory]
    assert total == ps.flops_of(model.config)
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    assert "unsupported" not in caplog.text.lower()


@pytest.mark.parametrize(
    "factory", [ps.deit_small_distilled_patch16_224, ps.deit3_small_patch16_224]
)
def test_other_layouts_count_as_the_formula(factory):
    model = factory(img_size=64).eval()
    with torch.no_grad():
        assert ps.count_flops(model, (torch.randn(1, 3, 64, 64),)) == ps.flops_of(model.config)


def test_pruned_keep_counts_reduce_flops():
    config = ps.deit_small_patch16_224().config
    dense = ps.flops_of(config)
    pyramid = [197] * 3 + [150] * 3 + [100] * 3 + [50, 20, 1]
    assert ps.flops_of(config, pyramid) < dense
    assert ps.flops_of(config, [197] * 12) == dense


def test_a_slimmed_model_with_a_token_order_counts_quietly(caplog):
    model = ps.digits_vit().eval()
    order = torch.cat((torch.zeros(1, dtype=torch.long), 1 + torch.randperm(49)))
    counts = [50] * 4 + [31] * 4 + [19, 10, 1, 1]
    model.set_plan(ps.SlimPlan(order, counts, 1))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        analysis = flop_analysis(model, (torch.randn(1, 1, 28, 28),))
        total = analysis.total()
    assert total == ps.flops_of(model.config, counts)
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    assert "unsupported" not in caplog.text.lower()


@pytest.mark.parametrize(
    ("keep_counts", "message"),
    [
        ([50] * 11, "must have depth=12 entries"),
        ([51] + [50] * 11, r"must be in \[1, N=50\]"),
        ([50] * 11 + [0], r"must be in \[1, N=50\]"),
        ([40, 45] + [1] * 10, "non-increasing"),
    ],
)
def test_bad_keep_counts(keep_counts, message):
    with pytest.raises(ValueError, match=message):
        ps.flops_of(ps.digits_vit().config, keep_counts)
