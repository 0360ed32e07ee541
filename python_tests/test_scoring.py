"""Eq. 13 scores: the chain against explicit head-path enumeration, the ops against
plain torch, ISA paths, opcheck, bad inputs and a fuzz test."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import cpu_and_cuda, cpu_isas
from hypothesis import given, settings
from hypothesis import strategies as st

from patchslim_ext.ops import (
    patch_scores,
    score_chain_diagonal,
    score_chain_step,
    score_factor_step,
)
from patchslim_ext.ops.scoring import (
    _patch_scores_reference,
    _score_chain_diagonal_reference,
    _score_chain_step_reference,
    _score_factor_step_reference,
)
from patchslim_ext.scoring import (
    ScoreAccumulator,
    chain_diagonal,
    impact_scores,
    per_image_scores,
)


def _softmax_maps(batch, heads, kept, tokens, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, tokens, tokens, generator=gen, dtype=torch.float64) * 2
    return torch.softmax(logits, -1)[:, :, :kept].to(device=device, dtype=dtype)


def _problem(batch, heads, tokens, channels, keep_counts, seed=0, dtype=torch.float64):
    """Block t's full map, the maps above it on their kept rows, and Z_{t-1}."""
    attn = [_softmax_maps(batch, heads, tokens, tokens, dtype, seed=seed)]
    attn += [
        _softmax_maps(batch, heads, n, tokens, dtype, seed=seed + 1 + j)
        for j, n in enumerate(keep_counts)
    ]
    gen = torch.Generator().manual_seed(seed + 100)
    z_in = torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float64).to(dtype)
    return attn, z_in


def _enumerate_paths(attn, z_in, keep_counts):
    """Eq. 13 literally: Σ over every head path of ‖A[:, i] U[i, :]‖_F², per image.

    A = B_L^{h_L} ··· B_{t+1}^{h_{t+1}} with B_l^h = diag(m_l) P_l^h (kept rows = prefix),
    U = P_t^{h_t} |Z_{t-1}|. Also returns Σ_paths ‖A[:, i]‖² = diag(S_t).
    """
    batch, heads_t, tokens, _ = attn[0].shape
    scores = torch.zeros(batch, tokens, dtype=torch.float64)
    diagonal = torch.zeros(batch, tokens, dtype=torch.float64)
    for b in range(batch):
        masked = []
        for maps, kept in zip(attn[1:], keep_counts, strict=True):
            full = torch.zeros(maps.shape[1], tokens, tokens, dtype=torch.float64)
            full[:, :kept] = maps[b].double()
            masked.append(full)
        U = attn[0][b].double() @ z_in[b].double().abs()
        for path in itertools.product(*(range(m.shape[0]) for m in masked)):
            A = torch.eye(tokens, dtype=torch.float64)
            for level, head in enumerate(path):
                A = masked[level][head] @ A
            for i in range(tokens):
                diagonal[b, i] += A[:, i].square().sum()
                for h in range(heads_t):
                    scores[b, i] += torch.outer(A[:, i], U[h, i]).square().sum()
    return scores, diagonal


def _relative_error(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


EXACT_CASES = [
    # (batch, heads, N, C, keep_counts [n_{t+1}, ..., n_L]); L - t <= 4, H <= 3, N <= 9.
    (2, 2, 6, 3, [4, 2, 1]),
    (1, 3, 9, 4, [7, 5, 2, 1]),
    (2, 3, 5, 2, [1]),
    (1, 2, 7, 3, [7, 6, 3, 1]),
    (2, 1, 8, 5, [8, 8, 8, 1]),
    (1, 3, 9, 2, [9, 2, 2, 1]),
]


@pytest.mark.parametrize("case", EXACT_CASES, ids=str)
def test_chain_equals_path_enumeration(case):
    batch, heads, tokens, channels, keep_counts = case
    attn, z_in = _problem(batch, heads, tokens, channels, keep_counts, seed=len(keep_counts))
    want_scores, want_diagonal = _enumerate_paths(attn, z_in, keep_counts)
    assert _relative_error(chain_diagonal(attn[1:]), want_diagonal) <= 1e-10
    got = per_image_scores(attn, z_in, keep_counts)
    assert _relative_error(got, want_scores) <= 1e-10
    means = impact_scores(attn, z_in, keep_counts)
    assert _relative_error(means, want_scores.mean(0)) <= 1e-10


def test_block_without_blocks_above_uses_identity():
    attn, z_in = _problem(2, 2, 5, 3, [])
    want, _ = _enumerate_paths(attn, z_in, [])
    assert _relative_error(per_image_scores(attn, z_in, []), want) <= 1e-12


def test_order_permutes_back():
    tokens, keep = 8, [5, 3, 1]
    attn, z_in = _problem(2, 2, tokens, 4, keep, seed=7)
    order = torch.tensor([0, 5, 2, 7, 1, 3, 6, 4])  # class token first
    inverse = torch.argsort(order)
    # The same problem with tokens in their original positions.
    original = [attn[0][:, :, inverse][..., inverse]] + [m[..., inverse] for m in attn[1:]]
    scores = impact_scores(original, z_in[:, inverse], keep, order=order)
    torch.testing.assert_close(scores[order], impact_scores(attn, z_in, keep))


def test_attn_and_rollout_baselines():
    keep = [4, 2, 1]
    attn, z_in = _problem(3, 2, 6, 3, keep, seed=3)
    torch.testing.assert_close(
        impact_scores(attn, z_in, keep, method="attn"), attn[0].square().sum((1, 3)).mean(0)
    )
    # Rollout: the head-summed chain, one "path" of summed maps.
    summed = [attn[0].sum(1, keepdim=True)] + [m.sum(1, keepdim=True) for m in attn[1:]]
    want, _ = _enumerate_paths(summed, z_in, keep)
    got = impact_scores(attn, z_in, keep, method="rollout")
    assert _relative_error(got, want.mean(0)) <= 1e-10


def test_random_is_seeded():
    attn, z_in = _problem(1, 2, 6, 3, [2, 1])
    first = impact_scores(
        attn, z_in, [2, 1], method="random", generator=torch.Generator().manual_seed(1)
    )
    again = impact_scores(
        attn, z_in, [2, 1], method="random", generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(first, again) and first.shape == (6,)


@pytest.mark.parametrize("method", ["impact", "rollout", "attn"])
def test_accumulator_streams_batches(method):
    keep = [5, 2, 1]
    attn, z_in = _problem(6, 2, 7, 3, keep, seed=11)
    accumulator = ScoreAccumulator(7, method=method)
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
        accumulator.update([m[part] for m in attn], z_in[part], keep)
    assert accumulator.count == 6
    torch.testing.assert_close(accumulator.scores(), impact_scores(attn, z_in, keep, method=method))


def test_accumulator_without_batches():
    with pytest.raises(RuntimeError, match="no calibration batch"):
        ScoreAccumulator(5).scores()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a, z, k: (a[:-1], z, k), "one map per entry of keep_counts"),
        (lambda a, z, k: ([a[0][:, :, :3], *a[1:]], z, k), r"attn\[0\] must be block t's full map"),
        (lambda a, z, k: ([a[0][:0], *a[1:]], z, k), "empty batch"),
        (lambda a, z, k: (a, z[:, :4], k), r"z_in must have shape \(B, N, C\) = \(2, 6, C\)"),
        (lambda a, z, k: (a, z, [4, 3, 2]), r"attn\[2\] must have shape"),
        (lambda a, z, k: (a, z, [4, 5, 1]), r"keep_counts\[1\] must be in \[1, 4\]"),
    ],
)
def test_api_bad_inputs(mutate, message):
    attn, z_in = _problem(2, 2, 6, 3, [4, 2, 1])
    with pytest.raises(ValueError, match=message):
        impact_scores(*mutate(attn, z_in, [4, 2, 1]))


def test_api_bad_order_and_method():
    attn, z_in = _problem(1, 2, 6, 3, [2, 1])
    with pytest.raises(ValueError, match="permutation"):
        impact_scores(attn, z_in, [2, 1], order=torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="method must be one of"):
        impact_scores(attn, z_in, [2, 1], method="magic")


# The ops against plain torch.


def _step_reference(S, attn, n_out):
    return _score_chain_step_reference(S.double(), attn.double(), n_out)


def _random_psd(batch, size, rank, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(batch, rank, size, generator=gen, dtype=torch.float64)
    return (factor.mT @ factor).to(device=device, dtype=dtype), factor.to(
        device=device, dtype=dtype
    )


def _tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def _op_dtypes(device):
    return [torch.float32, torch.float64] if device == "cpu" else [torch.float32]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ops_match_torch(device):
    for dtype in _op_dtypes(device):
        tol = _tolerance(dtype)
        attn = _softmax_maps(3, 4, 6, 11, dtype, device, seed=5)
        S, F = _random_psd(3, 8, 3, dtype, device, seed=6)
        for n_out in (6, 9, 11):
            got = score_chain_step(S, attn, n_out)
            assert _relative_error(got.cpu(), _step_reference(S.cpu(), attn.cpu(), n_out)) <= tol
            factor = score_factor_step(F, attn, n_out)
            assert (
                _relative_error(
                    (factor.mT @ factor).cpu(), _step_reference(S.cpu(), attn.cpu(), n_out)
                )
                <= tol
            )
        full = _step_reference(S.cpu(), attn.cpu(), 11).diagonal(dim1=1, dim2=2)
        assert _relative_error(score_chain_diagonal(S, attn, False).cpu(), full) <= tol
        assert _relative_error(score_chain_diagonal(F, attn, True).cpu(), full) <= tol


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("channels", [3, 64], ids=["direct", "gram"])
def test_patch_scores_match_torch(device, channels):
    # C=3 takes the direct route (H·N²·C), C=64 the Gram route (N²·C + H·N³).
    for dtype in _op_dtypes(device):
        attn = _softmax_maps(2, 3, 10, 10, dtype, device, seed=channels)
        z_in = torch.randn(2, 10, channels, dtype=dtype, device=device)
        s_diag = torch.rand(2, 10, dtype=dtype, device=device)
        want = _patch_scores_reference(s_diag.double(), attn.double(), z_in.double())
        got = patch_scores(s_diag, attn, z_in)
        assert _relative_error(got.cpu(), want.cpu()) <= _tolerance(dtype)


@pytest.mark.parametrize("isa", cpu_isas())
def test_each_cpu_isa_gives_the_same_scores(isa, cpu_isa_env):
    keep = [17, 9, 1]
    attn, z_in = _problem(3, 3, 23, 40, keep, seed=2, dtype=torch.float32)
    cpu_isa_env("scalar")
    want = per_image_scores(attn, z_in, keep)
    want_direct = patch_scores(torch.ones(3, 23), attn[0], z_in[..., :5])
    cpu_isa_env(isa)
    torch.testing.assert_close(per_image_scores(attn, z_in, keep), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        patch_scores(torch.ones(3, 23), attn[0], z_in[..., :5]), want_direct, rtol=1e-5, atol=0
    )


def test_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (no GPU on this machine, or torch built without CUDA)")
    keep = [150, 90, 40, 1]
    attn, z_in = _problem(4, 6, 197, 384, keep, seed=9, dtype=torch.float32)
    cpu = per_image_scores(attn, z_in, keep)
    cuda = per_image_scores([m.cuda() for m in attn], z_in.cuda(), keep)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    attn = _softmax_maps(2, 3, 4, 7, dtype, device, seed=1)
    S, F = _random_psd(2, 5, 2, dtype, device)
    full = _softmax_maps(2, 3, 7, 7, dtype, device, seed=2)
    z_in = torch.randn(2, 7, 5, dtype=dtype, device=device)
    ops = torch.ops.patchslim
    torch.library.opcheck(ops.score_chain_step.default, (S, attn, 6))
    torch.library.opcheck(ops.score_factor_step.default, (F, attn, 7))
    torch.library.opcheck(ops.score_chain_diagonal.default, (S, attn, False))
    torch.library.opcheck(ops.score_chain_diagonal.default, (F, attn, True))
    torch.library.opcheck(
        ops.patch_scores.default, (torch.rand(2, 7, dtype=dtype, device=device), full, z_in)
    )


def test_compiled_chain_fullgraph():
    keep = [5, 3, 1]
    attn, z_in = _problem(2, 2, 7, 4, keep, dtype=torch.float32)

    def scores(a0, a1, a2, a3, z):
        state = score_factor_step(torch.ones(2, 1, 1), a3, 3)
        state = score_factor_step(state, a2, 5)
        return patch_scores(score_chain_diagonal(state, a1, True), a0, z)

    compiled = torch.compile(scores, fullgraph=True)
    torch.testing.assert_close(compiled(*attn, z_in), per_image_scores(attn, z_in, keep))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda S, F, a, f, z, d: score_chain_step(S, a[0], 5),
            r"attn must have shape \(B, H, n, N\)",
        ),
        (
            lambda S, F, a, f, z, d: score_chain_step(S[:, :3, :3], a, 5),
            r"S covers M=3 tokens but attn has n=4",
        ),
        (
            lambda S, F, a, f, z, d: score_chain_step(S[:, :, :4], a, 5),
            r"S must be square, \(B, M, M\)",
        ),
        (lambda S, F, a, f, z, d: score_chain_step(S[:1], a, 5), "S has batch 1 but attn has B=2"),
        (lambda S, F, a, f, z, d: score_chain_step(S, a, 8), r"n_out must be in \[0, N=7\], got 8"),
        (lambda S, F, a, f, z, d: score_chain_step(S.float(), a, 5), "S must have attn's dtype"),
        (
            lambda S, F, a, f, z, d: score_chain_step(S, a.transpose(2, 3)[:, :, :, :4], 5),
            r"n=7 kept rows but only N=4",
        ),
        (lambda S, F, a, f, z, d: score_factor_step(F[:, :, :2], a, 5), r"F covers M=2 tokens"),
        (
            lambda S, F, a, f, z, d: score_chain_diagonal(F[0], a, True),
            r"F must have shape \(B, R, M\)",
        ),
        (
            lambda S, F, a, f, z, d: patch_scores(d, a, z),
            r"attn must be block t's full map \(B, H, N, N\)",
        ),
        (
            lambda S, F, a, f, z, d: patch_scores(d[:, :3], f, z),
            r"s_diag must have shape \(B, N\) = \(2, 7\)",
        ),
        (
            lambda S, F, a, f, z, d: patch_scores(d, f, z[:, :3]),
            r"z_in must have shape \(B, N, C\)",
        ),
        (
            lambda S, F, a, f, z, d: patch_scores(*(t.to(torch.float8_e4m3fn) for t in (d, f, z))),
            "CPU supports float32, float64, bfloat16 and float16",
        ),
        (
            lambda S, F, a, f, z, d: patch_scores(d, f.long(), z),
            "attn must be a floating-point tensor",
        ),
    ],
)
def test_ops_bad_inputs_name_the_argument(call, message):
    attn = _softmax_maps(2, 3, 4, 7, seed=1)
    full = _softmax_maps(2, 3, 7, 7, seed=2)
    S, F = _random_psd(2, 5, 2, torch.float64)
    z_in = torch.randn(2, 7, 5, dtype=torch.float64)
    s_diag = torch.rand(2, 7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        call(S, F, attn, full, z_in, s_diag)


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(0, 3),
    heads=st.integers(1, 3),
    kept=st.integers(0, 7),
    tokens=st.integers(1, 7),
    state_rows=st.integers(0, 8),
    state_cols=st.integers(0, 8),
    n_out=st.integers(-1, 8),
    factored=st.booleans(),
    dtype=st.sampled_from(
        [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32]
    ),
    strided=st.booleans(),
)
def test_fuzz_chain_ops_never_crash(
    batch, heads, kept, tokens, state_rows, state_cols, n_out, factored, dtype, strided
):
    """Any shape, stride or dtype: the reference result or a RuntimeError, never a crash."""
    attn = torch.rand(batch, heads, 2 * kept, tokens).to(dtype)
    attn = attn[:, :, ::2] if strided else attn[:, :, :kept]
    state = torch.rand(batch, state_rows, state_cols).to(dtype)
    if strided:
        state = state.transpose(1, 2).contiguous().transpose(1, 2)
    square = state_rows == state_cols
    valid_common = kept <= tokens and state_cols >= kept and dtype.is_floating_point
    calls = [
        (
            lambda: score_chain_diagonal(state, attn, factored),
            valid_common and (factored or square),
        ),
        (lambda: score_factor_step(state, attn, n_out), valid_common and 0 <= n_out <= tokens),
        (
            lambda: score_chain_step(state, attn, n_out),
            valid_common and square and 0 <= n_out <= tokens,
        ),
    ]
    for call, valid in calls:
        if not valid:
            with pytest.raises(RuntimeError):
                call()
            continue
        out = call()
        assert torch.isfinite(out).all()


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 3),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 6),
    rows=st.integers(0, 7),
    channels=st.integers(0, 70),
    diag_len=st.integers(0, 7),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int32]),
    strided=st.booleans(),
)
def test_fuzz_patch_scores_never_crash(
    batch, heads, tokens, rows, channels, diag_len, dtype, strided
):
    attn = torch.rand(batch, heads, rows, 2 * tokens).to(dtype)
    attn = attn[..., ::2] if strided else attn[..., :tokens]
    z_in = torch.randn(batch, tokens, channels).to(dtype)
    s_diag = torch.rand(batch, diag_len).to(dtype)
    valid = rows == tokens and diag_len == tokens and dtype.is_floating_point
    if not valid:
        with pytest.raises(RuntimeError):
            patch_scores(s_diag, attn, z_in)
        return
    want = _patch_scores_reference(s_diag.double(), attn.double(), z_in.double())
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(
        patch_scores(s_diag, attn, z_in).double(),
        want,
        rtol=tol,
        atol=tol * max(1.0, want.abs().max().item()) if want.numel() else tol,
    )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_and_inf_propagate_like_torch(device, cpu_isa_env):
    """A NaN probability, an Inf entry of S or F and a NaN feature of Z give the NaN/Inf
    pattern of the same products in plain torch."""
    for isa in cpu_isas() if device == "cpu" else [None]:
        if isa is not None:
            cpu_isa_env(isa)
        for dtype in _op_dtypes(device):
            attn = _softmax_maps(3, 2, 6, 19, dtype, device, seed=4)
            full = _softmax_maps(3, 2, 19, 19, dtype, device, seed=5)
            S, F = _random_psd(3, 8, 3, dtype, device, seed=6)
            z_in = torch.randn(3, 19, 40, dtype=dtype, device=device)
            s_diag = torch.rand(3, 19, dtype=dtype, device=device)
            attn[0, 1, 2, 7] = full[0, 0, 3, 4] = float("nan")
            S[1, 2, 2] = F[1, 0, 2] = float("inf")
            z_in[2, 5, 1] = float("nan")
            cases = [
                (score_chain_step, _score_chain_step_reference, (S, attn, 13)),
                (score_factor_step, _score_factor_step_reference, (F, attn, 13)),
                (score_chain_diagonal, _score_chain_diagonal_reference, (S, attn, False)),
                (score_chain_diagonal, _score_chain_diagonal_reference, (F, attn, True)),
                (patch_scores, _patch_scores_reference, (s_diag, full, z_in)),
                (patch_scores, _patch_scores_reference, (s_diag, full, z_in[..., :3])),
            ]
            for op, reference, args in cases:
                got, want = op(*args), reference(*args)
                assert not want.isfinite().all()
                label = f"{op.__name__} {isa} {dtype}"
                torch.testing.assert_close(
                    got, want, equal_nan=True, msg=lambda m, label=label: f"{label}: {m}"
                )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ops_equal_their_references(device):
    """Every op against the reference beside it, which is also its decomposition."""
    for dtype in _op_dtypes(device):
        attn = _softmax_maps(2, 3, 5, 13, dtype, device, seed=8)
        full = _softmax_maps(2, 3, 13, 13, dtype, device, seed=9)
        S, F = _random_psd(2, 7, 3, dtype, device, seed=10)
        z_in = torch.randn(2, 13, 33, dtype=dtype, device=device)
        s_diag = torch.rand(2, 13, dtype=dtype, device=device)
        cases = [
            (score_chain_step, _score_chain_step_reference, (S, attn, 9)),
            (score_factor_step, _score_factor_step_reference, (F, attn, 13)),
            (score_chain_diagonal, _score_chain_diagonal_reference, (S, attn, False)),
            (score_chain_diagonal, _score_chain_diagonal_reference, (F, attn, True)),
            (patch_scores, _patch_scores_reference, (s_diag, full, z_in)),
            (patch_scores, _patch_scores_reference, (s_diag, full, z_in[..., :2])),
        ]
        for op, reference, args in cases:
            got, want = op(*args), reference(*args)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert _relative_error(got, want) <= _tolerance(dtype), (op.__name__, dtype)


class _Scores(torch.nn.Module):
    def forward(self, S, F, attn, full, z_in):
        step = score_chain_step(S, attn, 6)
        factor = score_factor_step(F, attn, 7)
        diagonal = score_chain_diagonal(F, attn, True) + score_chain_diagonal(S, attn, False)
        return step, factor, patch_scores(diagonal, full, z_in)


def test_export_decomposes_the_scoring_ops():
    from patchslim_ext.ops import decompositions

    attn = _softmax_maps(2, 3, 4, 7, torch.float32, seed=1)
    full = _softmax_maps(2, 3, 7, 7, torch.float32, seed=2)
    S, F = _random_psd(2, 5, 2, torch.float32)
    args = (S, F, attn, full, torch.randn(2, 7, 5))
    program = torch.export.export(_Scores(), args).run_decompositions(decompositions())
    assert not [n for n in program.graph.nodes if "patchslim" in str(n.target)]
    for got, want in zip(program.module()(*args), _Scores()(*args), strict=True):
        assert _relative_error(got, want) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch(dtype, cpu_isa_env):
    """bfloat16/float16 on CPU: each op's error against the float32 reference is at most
    twice that of the same maths in plain torch at that dtype."""
    for isa in cpu_isas():
        cpu_isa_env(isa)
        attn = _softmax_maps(2, 3, 6, 21, dtype, seed=12)
        full = _softmax_maps(2, 3, 21, 21, dtype, seed=13)
        S, F = (t.to(dtype) for t in _random_psd(2, 9, 3, torch.float32, seed=14))
        z_in = torch.randn(2, 21, 40).to(dtype)
        s_diag = torch.rand(2, 21).to(dtype)
        cases = [
            (score_chain_step, _score_chain_step_reference, (S, attn, 15)),
            (score_factor_step, _score_factor_step_reference, (F, attn, 21)),
            (score_chain_diagonal, _score_chain_diagonal_reference, (S, attn, False)),
            (score_chain_diagonal, _score_chain_diagonal_reference, (F, attn, True)),
            (patch_scores, _patch_scores_reference, (s_diag, full, z_in)),
            (patch_scores, _patch_scores_reference, (s_diag, full, z_in[..., :3])),
        ]
        for op, reference, args in cases:
            want = reference(*(a.float() if torch.is_tensor(a) else a for a in args))
            ours, plain = op(*args), reference(*args)
            assert ours.dtype == dtype
            our_error = (ours.float() - want).abs().max().item()
            torch_error = (plain.float() - want).abs().max().item()
            floor = torch.finfo(dtype).eps * want.abs().max().item()
            assert our_error <= max(2 * torch_error, floor), (op.__name__, isa, our_error)
