"""Algorithm 1 end to end on a tiny ViT and a slice of the real digits: slimming,
resume after an interruption, fine-tuning, and DDP equivalence (2 CPU processes)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import patchslim_ext as ps
from patchslim_ext import runtime, slimming
from patchslim_ext.data import load_digits
from patchslim_ext.slimming import STATE_FILE, slim, uniform_keep_counts
from patchslim_ext.training import evaluate, finetune, train

TINY = ps.ViTConfig(
    img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2
)
DDP_SCRIPT = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def digits_slice() -> TensorDataset:
    images, labels = load_digits("train").tensors
    return TensorDataset(images[:384], labels[:384])


@pytest.fixture(scope="module")
def tiny_model(digits_slice) -> ps.VisionTransformer:
    """The tiny ViT trained for a few epochs, so that its attention is not random."""
    torch.manual_seed(0)
    model = ps.VisionTransformer.from_config(TINY)
    train(model, digits_slice, epochs=4, batch_size=64, lr=3e-3, warmup_epochs=0.5, progress=False)
    return model


def _slim(model, data, **options):
    # lr 1e-4: at 1e-3 a tuning step of this tiny model raises E, and is undone.
    settings = dict(r=3, block_epochs=1, calib_size=96, batch_size=32, lr=1e-4)
    if not {"eps", "flops_reduction", "keep_counts", "schedule"} & options.keys():
        settings["eps"] = 0.02  # a tolerance: one run (a FLOP target searches eps)
    settings.update(options)
    return slim(model, data, progress=False, **settings)


def test_slim_end_to_end(tiny_model, digits_slice):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    result = _slim(tiny_model, digits_slice)
    counts = result.plan.keep_counts
    assert counts[-1] == 1 and list(counts) == sorted(counts, reverse=True)
    # The plan's kept sets are nested prefixes of one order with the class token first.
    assert result.plan.token_order[0] == 0
    masks = result.plan.masks()
    assert bool((masks[1:] <= masks[:-1]).all())
    assert result.flops < ps.flops_of(TINY)
    assert [entry.block for entry in result.log] == [3, 2, 1]
    for entry in result.log:
        assert entry.kept == entry.kept_per_step[-1] == counts[entry.block - 1]
        # Every step but the last continued because E was above eps.
        assert all(error > 0.02 for error in entry.errors[:-1])
        if entry.reached_eps:
            assert entry.errors[-1] <= 0.02
        else:
            assert entry.kept == TINY.num_tokens
        assert entry.kept_per_step == sorted(entry.kept_per_step)
    # The input model is untouched; the result owns tuned copies.
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert any(
        not torch.equal(before[k], v)
        for k, v in result.model.state_dict().items()
        if k.startswith("blocks.")
    )

    test_images, test_labels = load_digits("test").tensors
    held_out = TensorDataset(test_images[:200], test_labels[:200])
    logs = finetune(
        result.model, tiny_model, digits_slice, epochs=1, batch_size=64, lr=1e-3, progress=False
    )
    assert len(logs) == 1 and torch.isfinite(torch.tensor(logs[0].loss))
    accuracy = evaluate(result.model, held_out)
    assert accuracy["images"] == 200 and 0.0 <= accuracy["top1"] <= 100.0


def test_tolerance_controls_the_plan(tiny_model, digits_slice):
    loose = _slim(tiny_model, digits_slice, eps=0.5, block_epochs=0)
    tight = _slim(tiny_model, digits_slice, eps=0.0, block_epochs=0)
    assert loose.flops <= tight.flops
    assert tight.plan.keep_counts[:-1] == (TINY.num_tokens,) * (TINY.depth - 1)


@pytest.mark.parametrize("score", ["rollout", "attn", "random"])
def test_fixed_schedule_matches_counts(tiny_model, digits_slice, score):
    counts = [15, 9, 5, 1]
    result = _slim(tiny_model, digits_slice, schedule="fixed", keep_counts=counts, score=score)
    assert list(result.plan.keep_counts) == counts
    assert all(len(entry.errors) == 1 for entry in result.log)


def test_uniform_schedule_matches_flops(tiny_model, digits_slice):
    ratio = 0.6
    result = _slim(tiny_model, digits_slice, schedule="uniform", flops_reduction=1 - ratio)
    counts = result.plan.keep_counts
    assert len(set(counts[:-1])) == 1 and counts[-1] == 1
    assert list(counts) == uniform_keep_counts(TINY, 1 - ratio)
    assert result.eps is None and all(entry.reached_eps is None for entry in result.log)
    one_fewer = [counts[0] - 1] * (TINY.depth - 1) + [1]
    assert result.flops >= ratio * ps.flops_of(TINY) > ps.flops_of(TINY, one_fewer)


def test_flops_target_is_met(tiny_model, digits_slice, tmp_path, monkeypatch):
    # At lr 1e-3 tuning is mostly undone, which keeps this tiny model's E above 1e-5 (the
    # smallest eps searched) for the tokens that matter.
    target, options = 0.45, dict(flops_reduction=0.45, lr=1e-3, run_dir=tmp_path / "run")
    result = _slim(tiny_model, digits_slice, **options)
    assert abs(result.flops_reduction - target) <= slimming.FLOPS_TOLERANCE
    assert not result.warnings
    assert [entry.flops_reduction for entry in result.search if entry.block_eps == result.block_eps]
    assert result.flops_reduction == pytest.approx(
        next(e.flops_reduction for e in result.search if e.block_eps == result.block_eps)
    )
    for entry in result.log:  # every block was held to its eps of the tolerance found
        assert entry.eps == result.block_eps[entry.block - 1]
        assert entry.reached_eps == (entry.errors[-1] <= entry.eps)
    # A rerun finds the search in the run directory: no run is repeated.
    runs = []
    real_run = slimming._Slimmer.run
    monkeypatch.setattr(
        slimming._Slimmer, "run", lambda self, *args: runs.append(args) or real_run(self, *args)
    )
    again = _slim(tiny_model, digits_slice, **options)
    assert again.plan == result.plan and again.search == result.search
    assert len(runs) <= 1  # at most the chosen run, replayed from its saved blocks


class _FakeSlimmer:
    """A stand-in for the search's slimmer on a 12-block model with 50 tokens: a block
    keeps 40 tokens below eps 0.002 and 10 at or above it, so one eps for every block
    jumps from about 21% to 80% fewer FLOPs; per-block tolerances fill the gap."""

    def __init__(self):
        self.config = ps.ViTConfig(
            img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=12,
            num_heads=3,
        )  # fmt: skip
        self.search = []
        self.runs = 0

    def run(self, tolerance, targets, resume, visited):
        self.runs += 1
        counts, above = {11: 1}, 1
        for block in range(10, -1, -1):
            above = max(above, 40 if tolerance[block] < 0.002 else 10)
            counts[block] = above
        return slimming._State(list(range(50)), counts, [])

    def forget_except(self, histories):
        pass


@pytest.mark.parametrize("target", [0.3, 0.45, 0.6])
def test_search_splits_eps_across_blocks_in_a_jump(target):
    slimmer = _FakeSlimmer()
    tolerance, state = slimming._search_eps(slimmer, target, None)
    reduction = slimming._flops_reduction(slimmer.config, state)
    assert abs(reduction - target) <= slimming.FLOPS_TOLERANCE
    assert slimmer.runs == len(slimmer.search) <= slimming.SEARCH_RUNS
    # The deeper blocks are held to the larger eps.
    assert list(tolerance) == sorted(tolerance) and len(set(tolerance)) > 1
    assert slimming.describe_eps(tolerance).startswith("eps ")


def test_blend_and_describe_eps():
    low, high = 0.001, 0.004
    assert slimming._blend(low, high, 0.0, 4) == (low,) * 4
    assert slimming._blend(low, high, 4.0, 4) == (high,) * 4
    blend = slimming._blend(low, high, 1.5, 4)
    assert blend[0] == blend[1] == low and blend[3] == high
    assert blend[2] == pytest.approx(0.002)  # halfway in log space
    assert slimming.describe_eps([0.002] * 3) == "eps 0.002"
    assert (
        slimming.describe_eps([0.001, 0.001, 0.002, 0.004, 0.004])
        == "eps 0.004 in blocks 4-5, 0.002 in block 3, 0.001 in blocks 1-2"
    )


def test_calib_size_is_an_upper_bound(tiny_model, digits_slice, caplog):
    with caplog.at_level("INFO", logger="patchslim"):
        result = _slim(tiny_model, digits_slice, calib_size=10_000, block_epochs=0)
    assert "calibrating on all 384 images" in caplog.text
    assert result.plan == _slim(tiny_model, digits_slice, calib_size=None, block_epochs=0).plan


def test_same_seed_same_plan(tiny_model, digits_slice):
    first = _slim(tiny_model, digits_slice, score="random", block_epochs=0)
    second = _slim(tiny_model, digits_slice, score="random", block_epochs=0)
    assert first.plan == second.plan


class _Interrupt(Exception):
    pass


def test_resume_after_interruption(tiny_model, digits_slice, tmp_path):
    run_dir = tmp_path / "run"
    uninterrupted = _slim(tiny_model, digits_slice)

    def stop_after_first_block(entry):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        _slim(tiny_model, digits_slice, run_dir=run_dir, on_block_end=stop_after_first_block)
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert list(state["keep_counts"]) == ["3", "2"]  # the last block and the first slimmed
    # The run's files get the mode of a new file (safetensors alone would write 0600).
    (tmp_path / "fresh").write_text("")
    fresh_mode = (tmp_path / "fresh").stat().st_mode & 0o777
    for name in (STATE_FILE, state["weights"]):
        assert (run_dir / name).stat().st_mode & 0o777 == fresh_mode
    # A kill while writing leaves only a temporary file next to the committed state.
    (run_dir / (STATE_FILE + ".partial")).write_text("{ truncated")
    finished = []
    resumed = _slim(tiny_model, digits_slice, run_dir=run_dir, on_block_end=finished.append)
    assert [entry.block for entry in finished] == [2, 1]  # block 3 was not redone
    assert resumed.plan == uninterrupted.plan
    for key, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    # A finished run resumes to the same result without any work.
    again = _slim(tiny_model, digits_slice, run_dir=run_dir, on_block_end=finished.append)
    assert again.plan == uninterrupted.plan and len(finished) == 2


def test_resume_refuses_other_settings(tiny_model, digits_slice, tmp_path):
    run_dir = tmp_path / "run"
    _slim(tiny_model, digits_slice, run_dir=run_dir, block_epochs=0)
    with pytest.raises(ValueError, match="different settings"):
        _slim(tiny_model, digits_slice, run_dir=run_dir, block_epochs=0, eps=0.5)
    (run_dir / STATE_FILE).write_text("{ not json")
    with pytest.raises(ValueError, match="cannot resume"):
        _slim(tiny_model, digits_slice, run_dir=run_dir, block_epochs=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score": "entropy"}, "score must be one of"),
        ({"schedule": "cubic"}, "schedule must be one of"),
        ({"schedule": "uniform", "eps": 0.1}, "'uniform' takes flops_reduction .* got eps"),
        ({"schedule": "fixed", "eps": None}, "'fixed' takes keep_counts, got neither"),
        ({"schedule": "fixed", "keep_counts": [17, 9, 5, 2]}, "end with 1"),
        ({"schedule": "fixed", "keep_counts": [9, 15, 5, 1]}, "non-increasing"),
        ({"flops_reduction": 0.5, "eps": 0.1}, "takes flops_reduction or eps .* got flops_"),
        ({"eps": 5}, r"eps must be in \[0, 1\)"),
        ({"flops_ratio": 0.5}, "has no setting flops_ratio"),
        ({"r": 0}, "r must be >= 1"),
    ],
)
def test_bad_options(tiny_model, digits_slice, options, message):
    with pytest.raises(ValueError, match=message):
        _slim(tiny_model, digits_slice, **options)


def test_bad_calibration_images(tiny_model):
    with pytest.raises(ValueError, match=r"shape \(M, 1, 28, 28\)"):
        _slim(tiny_model, torch.randn(8, 3, 28, 28))


def _torchrun(tmp_path: Path, tiny_model, nproc: int) -> dict:
    model_path = tmp_path / "tiny.safetensors"
    if not model_path.exists():
        ps.save_model(tiny_model, model_path)
    out = tmp_path / f"result-{nproc}.safetensors"
    command = [sys.executable, str(DDP_SCRIPT), str(model_path), str(out)]
    if nproc > 1:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *command[1:],
        ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "weights": ps.load_model(out).state_dict(),
        "plan": json.loads(out.with_suffix(".json").read_text()),
    }


def test_ddp_matches_single_process(tiny_model, tmp_path):
    single = _torchrun(tmp_path, tiny_model, 1)
    distributed = _torchrun(tmp_path, tiny_model, 2)
    # Slimming without block tuning: scores and errors are summed over the two shards.
    assert distributed["plan"] == single["plan"]
    for key, value in single["weights"].items():
        torch.testing.assert_close(distributed["weights"][key], value, rtol=1e-4, atol=1e-5)
    # The fine-tuning moved the weights (the comparison above is not vacuous).
    trained = tiny_model.state_dict()
    assert any(not torch.allclose(trained[k], v) for k, v in single["weights"].items())


def _masked_attention(block, x):
    """Block ``block``'s attention probabilities (B, H, N, N) on x, in plain torch ops."""
    batch, tokens, channels = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, channels // heads)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) * block.attn.scale, dim=-1)


def _eq13_by_paths(blocks, z_in, masks):
    """Eq. 13 by enumerating every head path, original token order, with the Eq. 2
    masked forward: block t = blocks[0] updates every token, blocks[j] the tokens of
    masks[j - 1]; a token a block drops passes through unchanged. Batch mean, (N,)."""
    x, maps = z_in.double(), []
    for j, block in enumerate(blocks):
        maps.append(_masked_attention(block, x))
        updated = block(x)
        x = updated if j == 0 else torch.where(masks[j - 1][None, :, None], updated, x)
    batch, tokens = z_in.shape[:2]
    scores = torch.zeros(batch, tokens, dtype=torch.float64)
    for b in range(batch):
        patch_term = (maps[0][b] @ z_in[b].double().abs()).square().sum((0, 2))  # Σ_h ‖U[i]‖²
        column_norms = torch.zeros(tokens, dtype=torch.float64)
        chains = [range(m.shape[1]) for m in maps[1:]]
        for path in itertools.product(*chains):
            product = torch.eye(tokens, dtype=torch.float64)
            for level, head in enumerate(path):
                kept = masks[level].double()[:, None]
                product = (kept * maps[level + 1][b, head]) @ product
            column_norms += product.square().sum(0)
        scores[b] = column_norms * patch_term
    return scores.mean(0)


def test_in_slim_scores_equal_path_enumeration(tiny_model, digits_slice, monkeypatch):
    """The scores slim computes for a block (in its prefix order, from the cached dense
    input, through the partially slimmed blocks above) equal Eq. 13 by explicit head-path
    enumeration in the original token order with Eq. 2 masks, on the same images: the
    dense blocks up to t, the result's tuned blocks above, its kept sets as masks."""
    recorded = {}

    def spy(student, inputs, block, counts, *rest):
        scores = slimming._block_scores.__wrapped__(student, inputs, block, counts, *rest)
        recorded[block] = (inputs.clone(), scores.clone())
        return scores

    spy.__wrapped__ = slimming._block_scores
    monkeypatch.setattr(slimming, "_block_scores", spy)
    images = digits_slice.tensors[0][:24]
    result = _slim(tiny_model, images, eps=0.05)
    masks = result.plan.masks()
    dense = copy.deepcopy(tiny_model).double().eval()
    tuned = copy.deepcopy(result.model).double().eval().set_plan(None)
    with torch.no_grad():
        z = dense.embed(images.double())
        inputs_by_block = [z]
        for block in dense.blocks:
            z = block(z)
            inputs_by_block.append(z)
        for block, (inputs, got) in recorded.items():
            z_in = inputs_by_block[block]
            # The run's token order: position p holds the token whose dense row it copied.
            order = [
                int(((z_in[0].float() - row).abs().sum(-1) < 1e-4).nonzero()[0])
                for row in inputs[0]
            ]
            assert sorted(order) == list(range(TINY.num_tokens))
            blocks = [dense.blocks[block], *tuned.blocks[block + 1 :]]
            want = _eq13_by_paths(blocks, z_in, masks[block + 1 :])
            got_original = torch.empty_like(got)
            got_original[torch.tensor(order)] = got
            error = (got_original.double() - want).abs().max() / want.abs().max()
            assert error < 1e-4, (block, error.item())
    assert sorted(recorded) == [0, 1, 2]


@pytest.mark.parametrize(
    ("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl"), (torch.device("cuda:0"), "nccl")]
)
def test_init_distributed_picks_the_backend_of_the_device(monkeypatch, device, backend):
    """The backend follows where the tensors are, not what the machine has: a model kept
    on the CPU of a GPU machine needs gloo."""
    joined, devices = [], []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", joined.append)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    assert runtime.init_distributed(device)
    assert joined == [backend]
    assert devices == ([1] if backend == "nccl" else [])


def test_init_distributed_outside_torchrun_does_nothing(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime.dist, "init_process_group", pytest.fail)
    assert not runtime.init_distributed("cuda")
