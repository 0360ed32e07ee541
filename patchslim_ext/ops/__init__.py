"""The ``torch.ops.patchslim`` operators, their fake kernels and autograd.

Importing this module loads the compiled library (which registers the schemas
and the CPU/CUDA kernels) and registers, from Python, the fake (meta) kernels
that ``torch.compile`` and ``torch.export`` trace with and the autograd
formulas. Every op is listed here with its shapes and dtypes.

``patchslim::prefix_layer_norm(Tensor input, SymInt n_rows, Tensor weight, Tensor bias, float eps)
-> (Tensor out, Tensor mean, Tensor rstd)``
    LayerNorm over the first ``n_rows`` rows of every image.

    - ``input``: (B, N, C); any strides (a non-unit channel stride costs a copy).
    - ``weight``, ``bias``: (C,), the input's dtype.
    - ``out``: (B, n_rows, C), contiguous, the input's dtype.
    - ``mean``, ``rstd``: (B, n_rows); float32 on CUDA and for bfloat16/float16 inputs,
      else the input's dtype.
    - dtypes: CPU float32/float64/bfloat16/float16; CUDA float32/float16/bfloat16;
      bfloat16 and float16 accumulate in float32.
    - ``0 <= n_rows <= N``; ``n_rows = 0`` or ``B = 0`` return empty tensors.

``patchslim::prefix_layer_norm_backward(Tensor grad_out, Tensor input, SymInt n_rows,
Tensor mean, Tensor rstd, Tensor weight) -> (Tensor grad_input, Tensor grad_weight,
Tensor grad_bias)``
    Backward of ``prefix_layer_norm``: ``grad_out`` (B, n_rows, C) to ``grad_input``
    (B, N, C; rows ``>= n_rows`` are zero), ``grad_weight`` and ``grad_bias`` (C,).

Scoring (paper Eq. 13, DESIGN.md §4). ``attn`` is always (B, H, n, N): block l's
attention probabilities on its n kept rows (prefix order), against all N tokens.
The chain state is ``S_l`` (B, M, M) or a factor ``F`` (B, R, M) with ``S_l = Fᵀ F``;
only its first ``n <= M`` rows/columns are read. dtypes: CPU float32/float64/bfloat16/
float16 (float32 accumulation), CUDA float32. Not differentiable.

``patchslim::score_chain_step(Tensor S, Tensor attn, SymInt n_out) -> Tensor``
    (B, n_out, n_out): the top-left block of ``S_{l-1} = Σ_h P_hᵀ S[:n, :n] P_h``.

``patchslim::score_factor_step(Tensor F, Tensor attn, SymInt n_out) -> Tensor``
    (B, R·H, n_out): the factor of that block, rows ``r·H + h`` = ``(F[:, :n] P_h)[r]``.

``patchslim::score_chain_diagonal(Tensor state, Tensor attn, bool factored) -> Tensor``
    (B, N): ``diag(S_{l-1})`` over all tokens, without forming ``S_{l-1}``.

``patchslim::patch_scores(Tensor s_diag, Tensor attn, Tensor z_in) -> Tensor``
    (B, N): ``s_diag ⊙ Σ_h ‖(P_h |Z|)[i, :]‖²`` with ``attn`` (B, H, N, N) and ``z_in`` (B, N, C).

Pruned block (paper Eq. 2, DESIGN.md §3): block input ``x`` (B, N, C) whose kept tokens
are rows ``[0, n_keep)``; weights in timm's layout. dtypes: CPU float32/float64/bfloat16/
float16; CUDA float32/float16/bfloat16; the row kernels (LayerNorm, softmax, bias+GELU,
bias+residual) accumulate bfloat16/float16 in float32, the GEMMs are ATen's (oneDNN on
CPU). The forward ops are differentiable in every floating input
through their own backward ops; besides their results they return the activations
the backward reads (as ``native_layer_norm`` returns its statistics). The ``_`` ops
update ``x`` in place for inference.

``patchslim::pruned_msa(Tensor x, SymInt n_keep, int num_heads, Tensor ln_weight,
Tensor ln_bias, Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, Tensor proj_bias,
float eps, float? scale=None) -> (Tensor out, Tensor attn, Tensor q, Tensor kv,
Tensor context)``
    ``out`` (B, n_keep, C) = ``x[:, :n] + Proj(softmax(s·Q Kᵀ) V)`` with ``Q`` from
    ``LN1(x)[:, :n]`` and ``K, V`` from all N rows of ``LN1(x)``; ``attn`` (B, H, n_keep, N)
    the probabilities; saved for the backward: ``q`` (B, n_keep, C), ``kv`` (B, N, 2C),
    ``context`` (B, n_keep, C). ``qkv_weight`` (3C, C), ``qkv_bias`` (3C,) or ``None``
    (no bias), ``proj_weight`` (C, C). ``scale`` ``s``: ``None`` is ``1/√d``, d = C/H.
    The attention core on CPU is one fused kernel in every dtype (fp32 accumulation for
    bfloat16/float16), faster than ATen's ``scaled_dot_product_attention`` and than
    matmul + softmax + matmul (``bench/bench_pruned_block.py``).

``patchslim::pruned_msa_(Tensor(a!) x, …, float eps, float? scale=None) -> ()``: the same,
written into ``x[:, :n_keep]``; the same attention kernel, which then writes no
probabilities (in bfloat16 on CPUs with AVX512-BF16, its bf16-pair variant).

``patchslim::pruned_msa_inference(Tensor x, …, float eps, float? scale=None) -> Tensor``:
``out`` alone, without the probabilities and saved activations; not differentiable (an
input that requires grad is refused under grad mode). What ``torch.compile`` and
``torch.export`` record ``pruned_msa_`` as, with a copy into ``x``'s prefix.

``patchslim::pruned_msa_backward(Tensor grad_out, Tensor? grad_attn, Tensor x, …,
Tensor attn, Tensor q, Tensor kv, Tensor context, float? scale=None) -> (grad_x,
grad_ln_weight, grad_ln_bias, grad_qkv_weight, grad_qkv_bias, grad_proj_weight,
grad_proj_bias)``
    Without a ``qkv_bias``, ``grad_qkv_bias`` (3C,) is the gradient a zero bias would get;
    the autograd formula returns ``None`` for it.

``patchslim::pruned_mlp(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight,
Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps) -> (Tensor out, Tensor pre)``
    Kept rows ``x`` (B, n, C) to ``x + FC2(GELU(FC1(LN2(x))))``; ``pre`` (B, n, D) is FC1's
    output before bias and GELU, saved for the backward. ``fc1_weight`` (D, C),
    ``fc2_weight`` (C, D); exact GELU.

``patchslim::pruned_mlp_(Tensor(a!) x, …) -> ()``: the same, in place.

``patchslim::pruned_mlp_inference(Tensor x, …) -> Tensor``: ``out`` alone (``pre`` not
kept), not differentiable; what ``pruned_mlp_`` is recorded as.

``patchslim::pruned_mlp_backward(Tensor grad_out, Tensor x, …, Tensor pre) -> (grad_x,
grad_ln_weight, grad_ln_bias, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias)``

Autocast (CPU and CUDA): the functional block ops (and the inference ops) run in the
autocast dtype, their inputs cast once (residual included: the result is in the
autocast dtype); the in-place ops keep ``x``'s dtype and cast the parameters to it;
``prefix_layer_norm`` and the scoring ops run in float32 (as autocast runs
``layer_norm``; the chain multiplies many maps). The in-place ops refuse inputs that
require grad under grad mode (a leaf with torch's own message), bump ``x``'s version
counter, and refuse an ``x`` whose elements overlap or parameters that share its memory.

References and export. Beside every op, in its Python module, is a reference in standard
torch ops (``_pruned_msa_reference`` next to ``pruned_msa``, …); the references of the
functional ops are their decompositions, in a table of our own, so that

    ep = torch.export.export(module, args)
    ep = ep.run_decompositions(patchslim_ext.ops.decompositions())

leaves no ``patchslim::`` node, and

    with patchslim_ext.ops.registered_decompositions():
        torch.onnx.export(module, args, dynamo=True, optimize=False)

writes standard ONNX ops (the ONNX exporter reads torch's global decomposition table,
where they are only while it runs: inductor refuses to call the kernel of an op that has
a decomposition there when the environment variable ``CI`` is set). Under
functionalization and the TorchScript tracer the in-place ops are their inference op
plus a copy into ``x``'s prefix, so they export the same way; the TorchScript ONNX
exporter (``dynamo=False``) stops at the first ``patchslim::`` op with an
``UnsupportedOperatorError`` naming it.
"""

import torch  # loads libtorch before the extension that links it

from patchslim_ext import _C
from patchslim_ext.ops._decompositions import DECOMPOSITIONS, registered_decompositions
from patchslim_ext.ops.layer_norm import prefix_layer_norm
from patchslim_ext.ops.pruned_block import pruned_mlp, pruned_msa
from patchslim_ext.ops.scoring import (
    patch_scores,
    score_chain_diagonal,
    score_chain_step,
    score_factor_step,
)

__all__ = [
    "cpu_isa",
    "decompositions",
    "patch_scores",
    "prefix_layer_norm",
    "pruned_mlp",
    "pruned_msa",
    "registered_decompositions",
    "score_chain_diagonal",
    "score_chain_step",
    "score_factor_step",
]


def cpu_isa() -> str:
    """The CPU instruction set the kernels run with now: ``"scalar"``, ``"avx2"``,
    ``"avx512"`` or ``"avx512_bf16"`` (AVX-512 with AVX512-BF16, which the bfloat16
    attention kernel uses). ``PATCHSLIM_CPU_ISA`` overrides the detected one (raises
    ``ValueError`` if this CPU lacks the requested one)."""
    return _C.active_cpu_isa()


def decompositions() -> dict:
    """``torch.export.default_decompositions()`` plus the reference decomposition of every
    functional patchslim op: pass it to ``ExportedProgram.run_decompositions`` to get a
    graph of core ATen ops only."""
    table = torch.export.default_decompositions()
    table.update(DECOMPOSITIONS)
    return table
