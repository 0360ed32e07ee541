"""Deployment: ONNX files of standard operators that ONNX Runtime runs with PyTorch's
logits (dense, slimmed, distilled, DeiT-III, T2T-ViT), and torch.export lowered to
standard ops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomise_parameters
from test_pruned import random_plan

import patchslim_ext as ps
from patchslim_ext.cli import main
from patchslim_ext.export import export_onnx

onnx = pytest.importorskip("onnx", reason="onnx is not installed (the [test] extra has it)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

SMALL = {"img_size": 32, "num_classes": 10}


def _model(factory, plan_seed: int | None):
    torch.manual_seed(0)
    model = randomise_parameters(factory(**SMALL), seed=1, scale=0.1).eval()
    if plan_seed is not None:
        model.set_plan(random_plan(model.config, plan_seed))
    return model


def _run_onnx(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def _relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize(
    ("factory", "plan_seed"),
    [
        (ps.deit_tiny_patch16_224, None),
        (ps.deit_tiny_patch16_224, 1),
        (ps.deit_small_distilled_patch16_224, 2),
        (ps.deit3_small_patch16_224, 3),
        (ps.t2t_vit_14, 4),
    ],
    ids=["dense", "slimmed", "distilled-slimmed", "deit3-slimmed", "t2t-slimmed"],
)
def test_onnx_round_trip_in_onnx_runtime(factory, plan_seed, tmp_path):
    model = _model(factory, plan_seed)
    path = export_onnx(model, tmp_path / "model.onnx", dynamic_batch=True)
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only
    assert not {node.op_type for node in graph.node} & {"ScatterND", "GatherND"}
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = model(images)
        assert _relative_error(_run_onnx(path, images), want) <= 1e-4
    assert model.plan is None or model.keep_counts == list(model.plan.keep_counts)


def test_static_batch_and_the_command(tmp_path, capsys):
    model = _model(ps.deit_tiny_patch16_224, 4)
    checkpoint = tmp_path / "slim.safetensors"
    ps.save_model(model, checkpoint)
    out = tmp_path / "slim.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--batch", "2",
                 "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["keep_counts"] == list(model.plan.keep_counts) and summary["batch"] == 2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _relative_error(_run_onnx(out, images), model(images)) <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_torch_export_lowers_a_slimmed_model_to_standard_ops(grad):
    model = _model(ps.deit_tiny_patch16_224, 5)
    images = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(model, (images,))
        lowered = program.run_decompositions(ps.ops.decompositions())
    targets = {str(node.target) for node in lowered.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "patchslim" in t], targets
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_the_torchscript_exporter_never_drops_blocks(grad, tmp_path):
    """The legacy exporter (dynamo=False) cannot express our ops: it must say so, also
    with ONNX_FALLTHROUGH, rather than write a file without the slimmed blocks."""
    model = _model(ps.deit_tiny_patch16_224, 6)
    images = torch.randn(2, 3, 32, 32)
    path = tmp_path / "legacy.onnx"
    with torch.set_grad_enabled(grad):
        with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="patchslim::"):
            torch.onnx.export(model, (images,), path, dynamo=False)
        try:
            torch.onnx.export(
                model,
                (images,),
                path,
                dynamo=False,
                operator_export_type=torch.onnx.OperatorExportTypes.ONNX_FALLTHROUGH,
            )
        except Exception as error:  # refusing is fine; a silently wrong file is not
            assert "patchslim" in str(error)
            return
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # With grad, the functional op; without, the in-place op as the tracer records it.
    kept_blocks = ops.count("pruned_msa") + ops.count("pruned_msa_inference")
    assert kept_blocks == model.config.depth, ops
