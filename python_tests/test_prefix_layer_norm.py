"""patchslim::prefix_layer_norm and its backward: numerics, ISA paths, autograd, opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_and_cuda, cpu_isas
from hypothesis import given, settings
from hypothesis import strategies as st

from patchslim_ext.ops import cpu_isa, decompositions, prefix_layer_norm
from patchslim_ext.ops.layer_norm import (
    _prefix_layer_norm_backward_reference,
    _prefix_layer_norm_reference,
)

EPS = 1e-6


def _inputs(batch, tokens, channels, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float64) * 3 + 0.5
    w = torch.randn(channels, generator=gen, dtype=torch.float64)
    b = torch.randn(channels, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w, b))


def _reference(x, n_rows, w, b):
    return F.layer_norm(x[:, :n_rows], (x.shape[-1],), w, b, EPS)


def _dtypes(device):
    return (
        [torch.float32, torch.float64, torch.bfloat16, torch.float16]
        if device == "cpu"
        else [torch.float32, torch.float16, torch.bfloat16]
    )


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 3), (3, 50, 96), (2, 197, 192), (1, 9, 1000)])
def test_matches_layer_norm(device, shape):
    batch, tokens, channels = shape
    for dtype in _dtypes(device):
        x, w, b = _inputs(*shape, dtype=dtype, device=device)
        for n_rows in sorted({1, tokens // 2 or 1, tokens}):
            out = prefix_layer_norm(x, n_rows, w, b, EPS)
            ref64 = _reference(*(t.double() for t in (x,)), n_rows, w.double(), b.double())
            torch_err = (_reference(x, n_rows, w, b).double() - ref64).abs().max()
            our_err = (out.double() - ref64).abs().max()
            assert out.shape == (batch, n_rows, channels)
            assert out.dtype == dtype
            assert out.is_contiguous()
            # At most 2x the error of plain torch at the same dtype, with a floor
            # for the cases where torch happens to be exact.
            floor = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
            assert our_err <= max(2 * torch_err, floor), (dtype, n_rows, our_err, torch_err)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_cpu_isa_gives_the_same_result(isa, dtype, cpu_isa_env):
    # Channel counts around the vector widths exercise full and partial chunks
    # (C = 1 is ill-conditioned: rstd ≈ 1/sqrt(eps) amplifies rounding noise).
    for channels in (3, 8, 15, 16, 17, 33, 96):
        x, w, b = _inputs(3, 7, channels, dtype=dtype, seed=channels)
        cpu_isa_env("scalar")
        ref = prefix_layer_norm(x, 5, w, b, EPS)
        grad_out = torch.randn_like(ref)
        ref_grads = torch.ops.patchslim.prefix_layer_norm_backward(
            grad_out, x, 5, *torch.ops.patchslim.prefix_layer_norm(x, 5, w, b, EPS)[1:], w
        )
        cpu_isa_env(isa)
        assert cpu_isa() == isa
        out, mean, rstd = torch.ops.patchslim.prefix_layer_norm(x, 5, w, b, EPS)
        grads = torch.ops.patchslim.prefix_layer_norm_backward(grad_out, x, 5, mean, rstd, w)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_unknown_or_unsupported_isa_is_refused(cpu_isa_env):
    x, w, b = _inputs(1, 2, 4)
    cpu_isa_env("sse9")
    with pytest.raises(ValueError, match="PATCHSLIM_CPU_ISA must be one of"):
        cpu_isa()
    with pytest.raises(RuntimeError, match="PATCHSLIM_CPU_ISA must be one of"):
        prefix_layer_norm(x, 1, w, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_strided_inputs(device):
    base, w, b = _inputs(4, 12, 40, device=device)
    views = {
        "batch-sliced": base[::2],
        "token-sliced": base[:, 1:],
        "channel-strided": torch.randn(4, 12, 80, device=device)[..., ::2],
        "transposed": base.transpose(0, 1).contiguous().transpose(0, 1),
    }
    for name, x in views.items():
        out = prefix_layer_norm(x, 3, w, b, EPS)
        torch.testing.assert_close(out, _reference(x, 3, w, b), msg=name)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_inputs(device):
    x, w, b = _inputs(0, 5, 8, device=device)
    assert prefix_layer_norm(x, 3, w, b).shape == (0, 3, 8)
    x, w, b = _inputs(2, 5, 8, device=device)
    out = prefix_layer_norm(x, 0, w, b)
    assert out.shape == (2, 0, 8)
    xr = x.clone().requires_grad_()
    prefix_layer_norm(xr, 0, w, b).sum().backward()
    assert torch.equal(xr.grad, torch.zeros_like(x))


def test_gradcheck_fp64():
    x, w, b = (t.requires_grad_() for t in _inputs(2, 6, 10, dtype=torch.float64))
    for n_rows in (1, 4, 6):
        assert torch.autograd.gradcheck(
            lambda x, w, b, n=n_rows: prefix_layer_norm(x, n, w, b, EPS), (x, w, b)
        )


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize(
    ("batch", "tokens", "channels", "n_rows"),
    # The second: 750 rows, which CUDA's weight and bias gradients sum in three splits
    # of rows (the last one partial), each split's rows crossing images.
    [(3, 9, 24, 4), (5, 197, 40, 150)],
)
def test_gradients_match_autograd_through_layer_norm(device, batch, tokens, channels, n_rows):
    x, w, b = (t.requires_grad_() for t in _inputs(batch, tokens, channels, device=device))
    grad_out = torch.randn(batch, n_rows, channels, device=device)
    ours = torch.autograd.grad(prefix_layer_norm(x, n_rows, w, b, EPS), (x, w, b), grad_out)
    ref = torch.autograd.grad(_reference(x, n_rows, w, b), (x, w, b), grad_out)
    for got, want in zip(ours, ref, strict=True):
        # Relative to the largest gradient: the parameters' sum over 750 rows.
        tolerance = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=tolerance)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w, b = _inputs(2, 7, 12, dtype=dtype, device=device)
    forward_args = (x.requires_grad_(), 3, w.requires_grad_(), b.requires_grad_(), EPS)
    torch.library.opcheck(torch.ops.patchslim.prefix_layer_norm.default, forward_args)
    with torch.no_grad():
        _, mean, rstd = torch.ops.patchslim.prefix_layer_norm(x, 3, w, b, EPS)
    grad_out = torch.randn(2, 3, 12, dtype=dtype, device=device)
    torch.library.opcheck(
        torch.ops.patchslim.prefix_layer_norm_backward.default,
        (grad_out, x.detach(), 3, mean, rstd, w.detach()),
    )


def test_torch_compile_fullgraph():
    x, w, b = _inputs(2, 11, 32)

    def fn(x, w, b):
        return prefix_layer_norm(x * 2, 5, w, b, EPS).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x, w, b), fn(x, w, b))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda x, w, b: (x[0], 1, w, b), r"input must have shape \(B, N, C\)"),
        (lambda x, w, b: (x, 6, w, b), r"n_rows must be in \[0, N=5\], got 6"),
        (lambda x, w, b: (x, -1, w, b), r"n_rows must be in \[0, N=5\], got -1"),
        (lambda x, w, b: (x, 1, w[:3], b), r"weight must have shape \(C,\) = \(8,\)"),
        (lambda x, w, b: (x, 1, w, b[None]), r"bias must have shape \(C,\) = \(8,\)"),
        (lambda x, w, b: (x, 1, w.double(), b), "weight and bias must have the input's dtype"),
        (
            lambda x, w, b: (
                x.to(torch.float8_e4m3fn),
                1,
                *(t.to(torch.float8_e4m3fn) for t in (w, b)),
            ),
            "CPU supports float32, float64, bfloat16 and float16",
        ),
    ],
)
def test_bad_inputs_name_the_argument(args, message):
    x, w, b = _inputs(2, 5, 8)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.patchslim.prefix_layer_norm(*args(x, w, b), EPS)


def test_bad_backward_inputs_name_the_argument():
    x, w, b = _inputs(2, 5, 8)
    _, mean, rstd = torch.ops.patchslim.prefix_layer_norm(x, 3, w, b, EPS)
    grad = torch.randn(2, 3, 8)
    backward = torch.ops.patchslim.prefix_layer_norm_backward
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(B, n_rows, C\)"):
        backward(grad[:, :2], x, 3, mean, rstd, w)
    with pytest.raises(RuntimeError, match=r"mean and rstd must have shape \(B, n_rows\)"):
        backward(grad, x, 3, mean[:, :1], rstd, w)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C,\)"):
        backward(grad, x, 3, mean, rstd, w[:1])


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 3),
    tokens=st.integers(1, 9),
    channels=st.integers(1, 40),
    n_rows=st.integers(-2, 11),
    dtype=st.sampled_from(
        [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]
    ),
    weight_len=st.integers(0, 41),
    transpose=st.booleans(),
)
def test_fuzz_never_crashes(batch, tokens, channels, n_rows, dtype, weight_len, transpose):
    """Any shape, stride or dtype either computes the reference or raises RuntimeError."""
    x = torch.randn(batch, tokens, channels).to(dtype)
    if transpose:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w = torch.randn(weight_len).to(dtype)
    b = torch.randn(weight_len).to(dtype)
    valid = 0 <= n_rows <= tokens and weight_len == channels and dtype.is_floating_point
    if not valid:
        with pytest.raises(RuntimeError):
            torch.ops.patchslim.prefix_layer_norm(x, n_rows, w, b, EPS)
        return
    out = prefix_layer_norm(x, n_rows, w, b, EPS)
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}.get(dtype, 1e-4)
    torch.testing.assert_close(out, _reference(x, n_rows, w, b), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_and_inf_rows_propagate_like_torch(device, cpu_isa_env):
    """A NaN row, and an Inf row (whose mean is Inf, so x - mean is NaN), give NaN in
    their own output and gradient rows only, as F.layer_norm does."""
    for isa in cpu_isas() if device == "cpu" else [None]:
        if isa is not None:
            cpu_isa_env(isa)
        for dtype in _dtypes(device)[:2]:
            x, w, b = _inputs(2, 6, 37, dtype=dtype, device=device)
            x[0, 1, 5] = float("nan")
            x[1, 3, 0] = float("inf")
            x, w, b = (t.requires_grad_() for t in (x, w, b))
            grad_out = torch.randn(2, 4, 37, dtype=dtype, device=device)
            ours = prefix_layer_norm(x, 4, w, b, EPS)
            want = _reference(x, 4, w, b)
            got_grads = torch.autograd.grad(ours, (x, w, b), grad_out)
            want_grads = torch.autograd.grad(want, (x, w, b), grad_out)
            assert ours.isnan().any(-1).sum() == 2
            for got, ref in zip((ours, *got_grads), (want, *want_grads), strict=True):
                torch.testing.assert_close(got, ref, equal_nan=True, msg=f"{isa} {dtype}")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_equal_their_references(device, dtype):
    """Forward (output and statistics) and backward against the references beside them."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA kernels take float32, float16 and bfloat16")
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    x, w, b = _inputs(3, 9, 37, dtype=dtype, device=device)
    for n_rows in (0, 1, 5, 9):
        got = torch.ops.patchslim.prefix_layer_norm(x, n_rows, w, b, EPS)
        want = _prefix_layer_norm_reference(x, n_rows, w, b, EPS)
        grad_out = torch.randn_like(want[0])
        got_grads = torch.ops.patchslim.prefix_layer_norm_backward(grad_out, x, n_rows, *got[1:], w)
        want_grads = _prefix_layer_norm_backward_reference(grad_out, x, n_rows, *want[1:], w)
        for g, r in zip((*got, *got_grads), (*want, *want_grads), strict=True):
            scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
            torch.testing.assert_close(g, r, rtol=tol, atol=tol * scale)


def test_export_decomposes_the_op():
    class Norm(torch.nn.Module):
        def forward(self, x, w, b):
            return prefix_layer_norm(x, 3, w, b, EPS)

    args = _inputs(2, 7, 12)
    program = torch.export.export(Norm(), args).run_decompositions(decompositions())
    assert not [n for n in program.graph.nodes if "patchslim" in str(n.target)]
    torch.testing.assert_close(program.module()(*args), Norm()(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_within_twice_plain_torch(dtype, cpu_isa_env):
    """Backward in bfloat16/float16 on CPU: every gradient's error against float32 is at
    most twice that of F.layer_norm's backward at that dtype."""
    for isa in cpu_isas():
        cpu_isa_env(isa)
        low = [t.to(dtype).requires_grad_() for t in _inputs(3, 11, 77, seed=5)]
        grad_out = torch.randn(3, 6, 77).to(dtype)
        ours = torch.autograd.grad(prefix_layer_norm(*low[:1], 6, *low[1:], EPS), low, grad_out)
        plain = torch.autograd.grad(_reference(low[0], 6, *low[1:]), low, grad_out)
        wide = [t.detach().float().requires_grad_() for t in low]
        want = torch.autograd.grad(_reference(wide[0], 6, *wide[1:]), wide, grad_out.float())
        for got, torch_got, ref in zip(ours, plain, want, strict=True):
            assert got.dtype == dtype
            our_error = (got.float() - ref).abs().max().item()
            torch_error = (torch_got.float() - ref).abs().max().item()
            floor = torch.finfo(dtype).eps * ref.abs().max().item()
            assert our_error <= max(2 * torch_error, floor), (isa, our_error, torch_error)
