"""Run by test_slimming.test_ddp_matches_single_process, alone or under torchrun:
slim a tiny model (no block tuning) on a digits slice, then fine-tune it for two
epochs with a global batch of 32, and save the plan and the weights.

    python ddp_worker.py MODEL.safetensors OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.data import load_digits
from patchslim_ext.runtime import init_distributed, process_group
from patchslim_ext.slimming import slim
from patchslim_ext.training import finetune


def main(model_path: str, out_path: str) -> None:
    init_distributed()
    torch.manual_seed(0)
    model = load_model(model_path)
    images, labels = load_digits("train").tensors
    data = TensorDataset(images[:128], labels[:128])
    result = slim(model, images[:64], eps=0.05, r=3, block_epochs=0, batch_size=16, progress=False)
    finetune(
        result.model, model, data, epochs=2, batch_size=32, lr=1e-3, progress=False,
        distillation="soft", temperature=2.0,
    )  # fmt: skip
    if process_group()[0] == 0:
        save_model(result.model, out_path)
        Path(out_path).with_suffix(".json").write_text(result.plan.to_json())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
