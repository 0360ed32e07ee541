"""The T2T module of T2T-ViT: official state-dict names, geometry, numerics, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchslim_ext import t2t
from patchslim_ext.flops import FREE_OPS, flop_analysis

# The official `tokens_to_token.*` state-dict entries of T2T-ViT-14 (performer) and
# T2T-ViT_t-14 (transformer): in_chans 3, token_dim 64, embed_dim 384, in registration
# order. Read off yitu-opensource/T2T-ViT: models/t2t_vit.py (T2T_module: attention1/2 on
# 3·7·7 = 147 and 64·3·3 = 576 inputs, project 576 -> 384), models/token_performer.py
# (Token_performer: kqv, proj, norm1, norm2, a Sequential mlp (Linear, GELU, Linear,
# Dropout) and the Parameter w of m = 64·0.5 = 32 rows), models/token_transformer.py
# (Token_transformer: norm1, attn.qkv without bias, attn.proj, norm2; mlp_ratio 1) and
# models/transformer_block.py (Mlp: fc1, fc2).
_PERFORMER_LAYER = {
    "w": (32, 64),  # first: a module's own parameters precede its children's
    "kqv.weight": (192, "D"),
    "kqv.bias": (192,),
    "proj.weight": (64, 64),
    "proj.bias": (64,),
    "norm1.weight": ("D",),
    "norm1.bias": ("D",),
    "norm2.weight": (64,),
    "norm2.bias": (64,),
    "mlp.0.weight": (64, 64),
    "mlp.0.bias": (64,),
    "mlp.2.weight": (64, 64),
    "mlp.2.bias": (64,),
}
_TRANSFORMER_LAYER = {
    "norm1.weight": ("D",),
    "norm1.bias": ("D",),
    "attn.qkv.weight": (192, "D"),
    "attn.proj.weight": (64, 64),
    "attn.proj.bias": (64,),
    "norm2.weight": (64,),
    "norm2.bias": (64,),
    "mlp.fc1.weight": (64, 64),
    "mlp.fc1.bias": (64,),
    "mlp.fc2.weight": (64, 64),
    "mlp.fc2.bias": (64,),
}


def _official_shapes(layer: dict[str, tuple]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for prefix, width in (("attention1", 147), ("attention2", 576)):
        for key, shape in layer.items():
            shapes[f"{prefix}.{key}"] = tuple(width if s == "D" else s for s in shape)
    shapes["project.weight"] = (384, 576)
    shapes["project.bias"] = (384,)
    return shapes


OFFICIAL_SHAPES = {
    "performer": _official_shapes(_PERFORMER_LAYER),
    "transformer": _official_shapes(_TRANSFORMER_LAYER),
}


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial LayerNorm affines and biases (weights keep their default init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = 0.1 * torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + noise)
            elif name.endswith("bias"):
                param.copy_(noise)
    return module.eval()


# ---- plain re-computations from a state dict ----------------------------------------


def _layer_norm(x: Tensor, s: dict[str, Tensor], prefix: str) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * s[f"{prefix}.weight"] + s[f"{prefix}.bias"]


def _linear(x: Tensor, s: dict[str, Tensor], prefix: str) -> Tensor:
    y = x @ s[f"{prefix}.weight"].T
    return y + s[f"{prefix}.bias"] if f"{prefix}.bias" in s else y


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def performer_reference(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """Token_performer written out, with the T×T kernel matrix formed explicitly."""
    emb = s["proj.weight"].shape[0]
    kqv = _linear(_layer_norm(x, s, "norm1"), s, "kqv")
    k, q, v = kqv[..., :emb], kqv[..., emb : 2 * emb], kqv[..., 2 * emb :]
    w = s["w"]
    m = w.shape[0]

    def features(u: Tensor) -> Tensor:  # positive random features exp(w·u - |u|²/2)/√m
        return torch.exp(u @ w.T - (u**2).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel = features(q) @ features(k).transpose(1, 2)  # (B, T, T): κ(q_t, k_s)
    attended = (kernel @ v) / (kernel.sum(-1, keepdim=True) + 1e-8)
    y = v + _linear(attended, s, "proj")
    hidden = _gelu(_linear(_layer_norm(y, s, "norm2"), s, "mlp.0"))
    return y + _linear(hidden, s, "mlp.2")


def transformer_reference(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """Token_transformer written out: one head, scale 1/√(input width), residual from v."""
    qkv = _linear(_layer_norm(x, s, "norm1"), s, "attn.qkv")
    q, k, v = qkv.chunk(3, dim=-1)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
    y = v + _linear(attn @ v, s, "attn.proj")
    hidden = _gelu(_linear(_layer_norm(y, s, "norm2"), s, "mlp.fc1"))
    return y + _linear(hidden, s, "mlp.fc2")


def soft_split_reference(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """(B, C, H, W) -> (B, rows·cols, C·kernel²): padded windows, row-major, channel-major."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    rows = (height + 2 * padding - kernel) // stride + 1
    cols = (width + 2 * padding - kernel) // stride + 1
    windows = [
        padded[:, :, i * stride : i * stride + kernel, j * stride : j * stride + kernel]
        for i in range(rows)
        for j in range(cols)
    ]
    return torch.stack([w.reshape(batch, -1) for w in windows], dim=1)


def t2t_reference(s: dict[str, Tensor], tokens_type: str, images: Tensor) -> Tensor:
    layer = performer_reference if tokens_type == "performer" else transformer_reference
    x = images
    for i, (kernel, stride, padding) in enumerate(((7, 4, 2), (3, 2, 1), (3, 2, 1))):
        rows = (x.shape[2] + 2 * padding - kernel) // stride + 1
        cols = (x.shape[3] + 2 * padding - kernel) // stride + 1
        x = soft_split_reference(x, kernel, stride, padding)
        if i == 2:
            break
        prefix = f"attention{i + 1}."
        x = layer({k[len(prefix) :]: v for k, v in s.items() if k.startswith(prefix)}, x)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)
    return _linear(x, s, "project")


# ---- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_state_dict_matches_official(tokens_type):
    module = t2t.TokensToToken(tokens_type=tokens_type)
    state = module.state_dict()
    assert list(state) == list(OFFICIAL_SHAPES[tokens_type])
    assert {k: tuple(v.shape) for k, v in state.items()} == OFFICIAL_SHAPES[tokens_type]

    # Held as `tokens_to_token`, it loads official-shaped entries with strict=True.
    holder = nn.Module()
    holder.tokens_to_token = t2t.TokensToToken(tokens_type=tokens_type)
    checkpoint = {
        f"tokens_to_token.{k}": torch.randn(shape)
        for k, shape in OFFICIAL_SHAPES[tokens_type].items()
    }
    holder.load_state_dict(checkpoint, strict=True)
    for key, value in holder.state_dict().items():
        assert torch.equal(value, checkpoint[key])


def test_performer_random_features_are_a_frozen_parameter():
    module = t2t.TokensToToken(tokens_type="performer")
    parameters = dict(module.named_parameters())
    for prefix in ("attention1", "attention2"):
        w = parameters[f"{prefix}.w"]  # a Parameter, as in the official code, not a buffer
        assert not w.requires_grad
        # Orthogonal rows scaled by √m (official init): w wᵀ = m·I.
        m = w.shape[0]
        torch.testing.assert_close(w @ w.T, m * torch.eye(m), atol=1e-4, rtol=0)
    assert dict(module.named_buffers()) == {}


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_output_shape_and_soft_split_geometry(tokens_type, monkeypatch):
    module = t2t.TokensToToken(tokens_type=tokens_type).eval()
    assert module.num_patches == 196
    assert module.grid_sizes(224, 224) == ((56, 56), (28, 28), (14, 14))
    seen = {}
    for name in ("attention1", "attention2"):
        getattr(module, name).register_forward_hook(
            lambda _m, args, out, name=name: seen.update({name: (args[0].shape, out.shape)})
        )
    splits = []
    soft_split = t2t.soft_split
    monkeypatch.setattr(
        t2t, "soft_split", lambda *args: splits.append(soft_split(*args)) or splits[-1]
    )
    with torch.no_grad():
        out = module(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 196, 384)
    assert seen["attention1"] == ((1, 56 * 56, 3 * 7 * 7), (1, 56 * 56, 64))
    assert seen["attention2"] == ((1, 28 * 28, 64 * 3 * 3), (1, 28 * 28, 64))
    # The last split is what `project` maps to embed_dim.
    assert [split.shape for split in splits] == [
        (1, 56 * 56, 3 * 7 * 7),
        (1, 28 * 28, 64 * 3 * 3),
        (1, 14 * 14, 64 * 3 * 3),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_splits_are_padded_windows(dtype):
    """soft_split on a channels-last view (of an image, or of tokens as their grid)
    equals nn.Unfold, the official soft split, transposed to tokens, with its features
    reordered by window_major."""
    images = torch.randn(2, 3, 32, 40, dtype=dtype)
    tokens = torch.randn(2, 15 * 9, 8, dtype=dtype)
    for kernel, stride, padding in t2t.SOFT_SPLITS:
        unfold = nn.Unfold(kernel, stride=stride, padding=padding)
        expected = soft_split_reference(images, kernel, stride, padding)
        assert torch.equal(unfold(images).transpose(1, 2), expected)
        got = t2t.soft_split(images.permute(0, 2, 3, 1), kernel, stride, padding)
        assert torch.equal(got, t2t.window_major(expected, 3))
        grid = tokens.view(2, 15, 9, 8)
        expected = soft_split_reference(grid.permute(0, 3, 1, 2), kernel, stride, padding)
        assert torch.equal(
            t2t.soft_split(grid, kernel, stride, padding), t2t.window_major(expected, 8)
        )


def test_window_major_order():
    """Feature c·k² + p (Unfold's) moves to p·C + c, for vectors and the rows of a matrix."""
    channels, window = 3, 4
    channel_major = torch.tensor([10 * c + p for c in range(channels) for p in range(window)])
    window_major = torch.tensor([10 * c + p for p in range(window) for c in range(channels)])
    assert torch.equal(t2t.window_major(channel_major, channels), window_major)
    rows = torch.stack([channel_major, -channel_major])
    assert torch.equal(t2t.window_major(rows, channels), torch.stack([window_major, -window_major]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("tokens_type", "reference"),
    [("performer", performer_reference), ("transformer", transformer_reference)],
)
def test_token_layers_against_reference(tokens_type, reference, dtype):
    module = _randomise(t2t.TokensToToken(img_size=32, tokens_type=tokens_type, token_dim=8))
    generator = torch.Generator().manual_seed(1)
    for name, tokens, channels in (("attention1", 64, 3), ("attention2", 16, 8)):
        layer = getattr(module, name).to(dtype)
        assert layer.window_channels == channels
        state = {k: v.double() for k, v in layer.state_dict().items()}
        x = torch.randn(2, tokens, state["norm1.weight"].shape[0], generator=generator)
        with torch.no_grad():
            # The layer takes soft_split's window-major order; its parameters and the
            # reference keep the official channel-major one.
            got = layer(t2t.window_major(x, channels).to(dtype))
        assert got.dtype == dtype and got.shape == (2, tokens, 8)
        tolerance = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(
            got.double(), reference(state, x.double()), rtol=tolerance, atol=tolerance
        )


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_module_against_reference(tokens_type, size):
    module = t2t.TokensToToken(img_size=32, tokens_type=tokens_type, token_dim=8, embed_dim=16)
    module = _randomise(module).double()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got = module(images)
    rows, cols = module.grid_sizes(*size)[-1]
    assert got.shape == (2, rows * cols, 16)
    expected = t2t_reference(module.state_dict(), tokens_type, images)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_eager_forward_takes_the_images_a_few_at_a_time(tokens_type, monkeypatch):
    """Chunks of TOKENS_PER_CHUNK first-layer tokens (2 images of 8×8 tokens here), with
    the outputs and gradients of the whole batch at once; traced graphs take the batch
    whole."""
    module = t2t.TokensToToken(img_size=32, tokens_type=tokens_type, token_dim=8, embed_dim=16)
    module = _randomise(module).double()
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    chunks = []
    tokens = module._tokens
    monkeypatch.setattr(module, "_tokens", lambda x: chunks.append(x.shape[0]) or tokens(x))
    grad_out = torch.randn(5, 4, 16, dtype=torch.float64)
    monkeypatch.setattr(t2t, "TOKENS_PER_CHUNK", 5 * 64)
    whole = module(images)
    (whole_grad,) = torch.autograd.grad(whole, images, grad_out)
    assert chunks == [5]
    monkeypatch.setattr(t2t, "TOKENS_PER_CHUNK", 2 * 64 + 63)
    chunked = module(images)
    (chunked_grad,) = torch.autograd.grad(chunked, images, grad_out)
    assert chunks == [5, 2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        traced = torch.jit.trace(module, images.detach(), check_trace=False)
    assert chunks[4:] == [5]
    torch.testing.assert_close(traced(images.detach()), whole.detach(), rtol=1e-12, atol=1e-12)
    # Off the CPU (meta tensors stand in for a GPU's) the batch goes whole: CUDA's
    # caching allocator has no page faults to save, and chunks would multiply launches.
    with torch.no_grad():
        module.to("meta")(images.detach().to("meta"))
    assert chunks[5:] == [5]


def test_export_keeps_the_batch_dynamic(monkeypatch):
    """torch.export sees the whole batch (no chunk loop), so a dynamic batch exports and
    runs at other sizes."""
    monkeypatch.setattr(t2t, "TOKENS_PER_CHUNK", 64)  # one image per chunk in eager calls
    module = _randomise(t2t.TokensToToken(img_size=32, token_dim=8, embed_dim=16)).eval()
    images = torch.randn(3, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module, (images,), dynamic_shapes=({0: batch},))
    assert not any("split" in str(node.target) for node in program.graph.nodes)
    more = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(more), module(more), rtol=1e-5, atol=1e-5)


def test_performer_features_stay_float32_under_autocast():
    layer = _randomise(t2t.TokensToToken(img_size=32, token_dim=8)).attention1
    x = torch.randn(2, 64, 147)
    with torch.no_grad():
        full = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)


def test_sinusoid_table_against_loop():
    for positions, dim in ((197, 384), (5, 7)):
        table = t2t.sinusoid_position_table(positions, dim)
        expected = torch.tensor(
            [
                [
                    (math.sin if j % 2 == 0 else math.cos)(p / 10000 ** (2 * (j // 2) / dim))
                    for j in range(dim)
                ]
                for p in range(positions)
            ],
            dtype=torch.float64,
        )
        assert table.shape == (1, positions, dim) and table.dtype == torch.float32
        # float64 values rounded once to float32, as the official numpy code does.
        assert torch.equal(table[0], expected.float())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"'performer', 'transformer'.*'convolution'"):
        t2t.TokensToToken(tokens_type="convolution")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        t2t.TokensToToken(img_size=32)(torch.randn(1, 1, 32, 32))


def _analytic_flops(tokens_type: str) -> int:
    """fvcore's convention (multiply-add = 1, LayerNorm = 5 per element) written out."""
    emb, m = 64, 32
    total = 196 * 576 * 384  # project
    for tokens, width in ((56 * 56, 147), (28 * 28, 576)):
        total += 5 * tokens * width + 3 * tokens * width * emb  # norm1, kqv / qkv
        total += 3 * tokens * emb * emb + 5 * tokens * emb  # proj, mlp, norm2
        if tokens_type == "performer":
            # w·k and w·q, kp ᵀ v and qp (kpᵀv), and the normaliser qp · Σ kp.
            total += 4 * tokens * emb * m + tokens * m
        else:
            total += 2 * tokens * tokens * emb  # q kᵀ and attn v
    return total


@pytest.mark.parametrize(
    ("tokens_type", "gflops"), [("performer", 0.304790976), ("transformer", 1.610044352)]
)
def test_fvcore_counts(tokens_type, gflops):
    fvcore_nn = pytest.importorskip("fvcore.nn")
    module = t2t.TokensToToken(tokens_type=tokens_type).eval()
    images = torch.randn(1, 3, 224, 224)
    raw = fvcore_nn.FlopCountAnalysis(module, images)
    raw.unsupported_ops_warnings(False)
    raw_total = raw.total()
    # Only the declared free ops are unknown to fvcore; nothing else is skipped.
    assert set(raw.unsupported_ops()) <= set(FREE_OPS)
    analysis = flop_analysis(module, images)
    total = analysis.total()
    assert dict(analysis.unsupported_ops()) == {}
    assert total == raw_total == _analytic_flops(tokens_type) == round(gflops * 1e9)
