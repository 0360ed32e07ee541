"""Hostile inputs to the patchslim command (issue 11): every case ends either in success
or in exactly one line on stderr with exit code 2, before any work where it can be
known before, with no input overwritten and no output (nor ``.partial``) left behind.

Most cases call ``main`` in this process (an exception escaping it is the traceback the
user would see); a few run the real command. The models are tiny (3 blocks, 17 tokens)
and the images a 16-image folder, so that every case takes well under a second or two.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import patchslim_ext as ps
from patchslim_ext import commands
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.cli import main

TINY = ps.ViTConfig(
    img_size=28, patch_size=7, in_chans=1, num_classes=2, embed_dim=32, depth=3, num_heads=2
)
SLIM_ARGS = [
    "--calib-size", "16", "--batch-size", "8", "--r", "4", "--block-epochs", "1", "--eps", "0.05"
]  # fmt: skip
LOOP_ARGS = ["--epochs", "1", "--batch-size", "8", "--json"]


# --- helpers -----------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` (to assert that a refused command wrote nothing)."""
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _one_error_line(stderr: str, *words: str) -> str:
    """The one error line of ``stderr``, its last; lines before it may only be the run's
    log (``patchslim: ...``, e.g. a model summary or a busy-machine warning)."""
    lines = stderr.strip().splitlines()
    assert lines and all(line.startswith("patchslim: ") for line in lines), stderr
    errors = [line for line in lines if line.startswith("patchslim: error: ")]
    assert errors == lines[-1:], f"expected one error line, last, on stderr, got:\n{stderr}"
    lines = lines[-1:]
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def _refused(capsys, argv: list[str], *words: str) -> str:
    """``main(argv)`` returns 2 with exactly one stderr line containing ``words``."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr:\n{captured.err}"
    return _one_error_line(captured.err, *words)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "patchslim_ext", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _image_folder(root: Path, classes: int = 2, per_class: int = 8) -> Path:
    generator = torch.Generator().manual_seed(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{index}.png")
    return root


def _tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model(ps.VisionTransformer.from_config(TINY), path)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense checkpoint, an image folder, and a finished slimming run directory."""
    root = tmp_path_factory.mktemp("shared")
    paths = {
        "dense": _tiny_checkpoint(root / "dense.safetensors"),
        "images": _image_folder(root / "images"),
    }
    run = root / "slim.safetensors.run"
    assert main(
        ["slim", "--checkpoint", str(paths["dense"]), "--data", str(paths["images"]),
         "--out", str(root / "slim.safetensors"), *SLIM_ARGS, "--json"]
    ) == 0  # fmt: skip
    paths["run"] = run
    return paths


@pytest.fixture
def work(tmp_path, shared) -> dict[str, Path]:
    """Per-test copies: the dense checkpoint and the run directory, in ``tmp_path``."""
    dense = tmp_path / "dense.safetensors"
    shutil.copy(shared["dense"], dense)
    run = tmp_path / "run"
    shutil.copytree(shared["run"], run)
    return {"root": tmp_path, "dense": dense, "images": shared["images"], "run": run}


def _nan_in(source: Path, target: Path, key: str) -> Path:
    """A copy of the checkpoint ``source`` with NaN in ``key``."""
    model = load_model(source)
    with torch.no_grad():
        model.state_dict()[key].fill_(float("nan"))
    save_model(model, target)
    return target


# --- 1. non-finite training, fine-tuning and slimming --------------------------------------


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_diverging_training_stops_and_writes_nothing(work, capsys, command):
    dense, out = work["dense"], work["root"] / "out.safetensors"
    before, files = _digest(dense), _tree(work["root"])
    source = ["--checkpoint", str(dense)]
    if command == "finetune":
        source += ["--teacher", str(dense)]
    line = _refused(
        capsys,
        [command, *source, "--data", str(work["images"]), "--out", str(out), "--lr", "1e30",
         *LOOP_ARGS],
        "epoch 1, step", "not finite",
    )  # fmt: skip
    assert "nothing was written" in line
    assert _tree(work["root"]) == files and _digest(dense) == before


def test_diverging_training_onto_its_input_keeps_the_input(work, capsys):
    dense = work["dense"]
    before = _digest(dense)
    _refused(
        capsys,
        ["train", "--checkpoint", str(dense), "--out", str(dense), "--data", str(work["images"]),
         "--lr", "1e30", *LOOP_ARGS],
        "--out", "--checkpoint", "overwrite",
    )  # fmt: skip
    assert _digest(dense) == before


def test_diverging_block_tuning_stops_at_the_block(work, capsys):
    out = work["root"] / "slim.safetensors"
    files = _tree(work["root"])
    _refused(
        capsys,
        ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(out), *SLIM_ARGS, "--lr", "1e30", "--json"],
        "block 2, tuning epoch 1, batch", "not finite",
    )  # fmt: skip
    new = _tree(work["root"]) - files
    # Nothing but the run directory of the blocks finished before (here: none tuned).
    assert not out.exists() and not any(name.endswith(".partial") for name in new)
    assert not list(work["root"].rglob("weights-*.safetensors.partial"))


def test_non_finite_reconstruction_error_is_an_error(work, capsys):
    """NaN only in the last block's MLP: the scores are finite, E is NaN. Before, E > eps
    was false, every token was added and a NaN model was saved with exit 0."""
    broken = _nan_in(work["dense"], work["root"] / "nan.safetensors", "blocks.2.mlp.fc2.bias")
    out = work["root"] / "slim.safetensors"
    _refused(
        capsys,
        ["slim", "--checkpoint", str(broken), "--data", str(work["images"]), "--out", str(out),
         *SLIM_ARGS, "--block-epochs", "0", "--json"],
        "block 2, step 1", "reconstruction error E is nan",
    )  # fmt: skip
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# --- 2. no command overwrites one of its inputs --------------------------------------------


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_slim_refuses_to_overwrite_its_input(work, capsys, link):
    dense = work["dense"]
    out = {"same": dense, "symlink": work["root"] / "sym.safetensors"}.get(
        link, work["root"] / "hard.safetensors"
    )
    if link == "symlink":
        out.symlink_to(dense)
    elif link == "hardlink":
        os.link(dense, out)
    before, files = _digest(dense), _tree(work["root"])
    _refused(
        capsys,
        ["slim", "--checkpoint", str(dense), "--out", str(out), "--data", str(work["images"]),
         *SLIM_ARGS],
        "--out", "is also --checkpoint",
    )  # fmt: skip
    assert _digest(dense) == before and _tree(work["root"]) == files  # no <out>.run either


def test_finetune_refuses_to_overwrite_its_teacher(work, capsys):
    dense = work["dense"]
    student = work["root"] / "student.safetensors"
    shutil.copy(dense, student)
    before = _digest(dense)
    _refused(
        capsys,
        ["finetune", "--checkpoint", str(student), "--teacher", str(dense), "--out", str(dense),
         "--data", str(work["images"]), *LOOP_ARGS],
        "is also --teacher",
    )  # fmt: skip
    assert _digest(dense) == before


def test_slim_refuses_an_input_inside_its_run_directory(work, capsys):
    inside = work["run"] / "dense.safetensors"
    shutil.copy(work["dense"], inside)
    _refused(
        capsys,
        ["slim", "--checkpoint", str(inside), "--out", str(work["root"] / "o.safetensors"),
         "--run-dir", str(work["run"]), "--data", str(work["images"]), *SLIM_ARGS],
        "lies in --run-dir",
    )  # fmt: skip
    assert inside.is_file()


# --- 3. resume validates what it loads ----------------------------------------------------


def _resume(capsys, work, *words: str) -> None:
    out = work["root"] / "resumed.safetensors"
    state = (work["run"] / "state.json").read_bytes()
    _refused(
        capsys,
        ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(out), "--run-dir", str(work["run"]), *SLIM_ARGS, "--json"],
        "cannot resume from", *words,
    )  # fmt: skip
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert (work["run"] / "state.json").read_bytes() == state


def _weights_file(run: Path) -> Path:
    return run / json.loads((run / "state.json").read_text())["weights"]


def test_resume_accepts_its_own_run_directory(work, capsys):
    out = work["root"] / "resumed.safetensors"
    argv = ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
            "--out", str(out), "--run-dir", str(work["run"]), *SLIM_ARGS, "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["keep_counts"][-1] == 1


def test_resume_refuses_weights_without_the_tuned_blocks(work, capsys):
    path = _weights_file(work["run"])
    weights = load_file(path)
    save_file({k: v for k, v in weights.items() if not k.startswith("blocks.0.")}, path)
    _resume(capsys, work, "does not hold exactly the tuned blocks", "lacks blocks.0.")


def test_resume_refuses_extra_tensors(work, capsys):
    path = _weights_file(work["run"])
    save_file({**load_file(path), "head.weight": torch.zeros(10, 32)}, path)
    _resume(capsys, work, "has unexpected head.weight")


def test_resume_refuses_nan_weights(work, capsys):
    path = _weights_file(work["run"])
    weights = load_file(path)
    weights["blocks.1.norm1.weight"][0] = float("nan")
    save_file(weights, path)
    _resume(capsys, work, "blocks.1.norm1.weight holds NaN")


def test_resume_refuses_other_shapes(work, capsys):
    path = _weights_file(work["run"])
    weights = load_file(path)
    weights["blocks.1.norm1.weight"] = torch.ones(31)
    save_file(weights, path)
    _resume(capsys, work, "blocks.1.norm1.weight is torch.float32 (31,)")


def test_resume_refuses_a_corrupted_weights_file(work, capsys):
    path = _weights_file(work["run"])
    path.write_bytes(path.read_bytes()[:100])
    _resume(capsys, work, f"cannot read {path.name}")


@pytest.mark.parametrize(
    "weights", ["../dense.safetensors", "/etc/passwd", "sub/weights-0.safetensors", 7]
)
def test_resume_refuses_weights_outside_the_run_directory(work, capsys, weights):
    state_path = work["run"] / "state.json"
    state = json.loads(state_path.read_text())
    state["weights"] = weights
    state_path.write_text(json.dumps(state))
    _resume(capsys, work, "not a weights-<block>.safetensors file in the run directory")


def test_resume_refuses_a_symlinked_weights_file(work, capsys):
    path = _weights_file(work["run"])
    outside = work["root"] / "elsewhere.safetensors"
    shutil.move(path, outside)
    path.symlink_to(outside)
    _resume(capsys, work, "is missing or not a plain file")


def test_resume_refuses_an_inconsistent_state(work, capsys):
    state_path = work["run"] / "state.json"
    state = json.loads(state_path.read_text())
    state["keep_counts"]["2"] = 5  # the last block keeps the class token only
    state_path.write_text(json.dumps(state))
    _resume(capsys, work, "non-increasing (nested kept sets)")


# --- 6. one line and exit 2 instead of a traceback ----------------------------------------


def test_non_image_file_named_png(work, capsys):
    images = _image_folder(work["root"] / "images")
    (images / "class1" / "fake.png").write_bytes(b"this is not a PNG")
    _refused(
        capsys,
        ["eval", "--checkpoint", str(work["dense"]), "--data", str(images), "--json"],
        "cannot read image", "fake.png",
    )  # fmt: skip


def test_truncated_png_in_held_out_set_is_found_before_training(work, capsys):
    images = _image_folder(work["root"] / "images")
    good = (images / "class0" / "0.png").read_bytes()
    (images / "class0" / "0.png").write_bytes(good[: len(good) // 2])
    out = work["root"] / "trained.safetensors"
    _refused(
        capsys,
        ["train", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--eval-data", str(images), "--out", str(out), *LOOP_ARGS],
        "cannot read image", str(images / "class0" / "0.png"),
    )  # fmt: skip
    assert not out.exists()


def test_truncated_png_in_eval_data(work, capsys):
    images = _image_folder(work["root"] / "images")
    good = (images / "class1" / "3.png").read_bytes()
    (images / "class1" / "3.png").write_bytes(good[:-30])
    _refused(
        capsys,
        ["eval", "--checkpoint", str(work["dense"]), "--data", str(images), "--json"],
        "cannot read image", "3.png",
    )  # fmt: skip


def test_bad_image_read_in_a_dataloader_worker(work):
    """An error raised in a DataLoader worker comes back wrapped in its traceback; the
    command still prints one line (the real command, so that the worker is a process)."""
    images = _image_folder(work["root"] / "images")
    good = (images / "class1" / "3.png").read_bytes()
    (images / "class1" / "3.png").write_bytes(good[:-30])
    # The training images are read lazily (only the held-out set is checked up front).
    out = work["root"] / "trained.safetensors"
    result = _run(
        "train", "--checkpoint", str(work["dense"]), "--data", str(images), "--out", str(out),
        "--workers", "1", *LOOP_ARGS,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    _one_error_line(result.stderr, "cannot read image", "3.png")
    assert not out.exists()


@pytest.mark.parametrize("classes", [1, 3])
def test_class_folders_must_match_the_head(work, capsys, classes):
    """eval, finetune and train use the labels: another number of class folders than the
    head's classes is refused, naming both; slim only warns (labels unused)."""
    images = _image_folder(work["root"] / "images", classes=classes, per_class=2)
    _refused(
        capsys,
        ["eval", "--checkpoint", str(work["dense"]), "--eval-data", str(images), "--json"],
        f"{classes} class folders", "head has 2 classes",
    )  # fmt: skip


def test_out_is_an_existing_directory(work, capsys):
    out = work["root"] / "a_directory"
    out.mkdir()
    files = _tree(work["root"])
    _refused(
        capsys,
        ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(out), *SLIM_ARGS],
        "--out", "is a directory",
    )  # fmt: skip
    assert _tree(work["root"]) == files  # refused before slimming: no .partial, no .run


def test_run_dir_is_a_file(work, capsys):
    _refused(
        capsys,
        ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(work["root"] / "o.safetensors"), "--run-dir", str(work["dense"]),
         *SLIM_ARGS],
        "--run-dir", "not a directory",
    )  # fmt: skip


@pytest.fixture
def read_only(tmp_path):
    """Make a directory read-only, also for root (``chattr +i``); undone afterwards."""
    made = []

    def apply(path: Path) -> None:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
            if done.returncode != 0:
                pytest.skip("running as root and chattr +i is not available here")
        else:
            path.chmod(0o555)
        made.append(path)

    yield apply
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_run_directory_is_refused_before_work(work, capsys, read_only):
    run = work["root"] / "fresh.run"
    run.mkdir()
    read_only(run)
    out = work["root"] / "o.safetensors"
    _refused(
        capsys,
        ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(out), "--run-dir", str(run), *SLIM_ARGS],
        "--run-dir", "not writable",
    )  # fmt: skip
    assert not out.exists() and not list(run.iterdir())


def test_read_only_output_directory(work, capsys, read_only):
    folder = work["root"] / "locked"
    folder.mkdir()
    read_only(folder)
    _refused(
        capsys,
        ["train", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(folder / "sub" / "o.safetensors"), *LOOP_ARGS],
        "--out", "not writable",
    )  # fmt: skip


def test_bad_cpu_isa_with_eval(work):
    result = _run(
        "eval", "--checkpoint", str(work["dense"]), "--data", str(work["images"]), "--json",
        env={"PATCHSLIM_CPU_ISA": "garbage"},
    )  # fmt: skip
    assert result.returncode == 2
    _one_error_line(result.stderr, "PATCHSLIM_CPU_ISA", "garbage")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--shift", "-1"], ["--shift", "-1"]),
        (["train", "--label-smoothing", "2"], ["--label-smoothing", "in [0, 1]"]),
        (["train", "--lr", "inf"], ["--lr", "finite"]),
        (["train", "--workers", "-1"], ["--workers"]),
        (["train", "--seed", "-5"], ["--seed"]),
        (["finetune", "--distill-weight", "3"], ["--distill-weight"]),
        (["slim", "--eps", "nan"], ["--eps"]),
        (["slim", "--block-epochs", "-1"], ["--block-epochs"]),
        (["slim", "--flops-ratio", "1.5", "--schedule", "uniform"], ["--flops-ratio"]),
        (["eval", "--batch-size", str(10**20)], ["--batch-size", "at most"]),
    ],
)
def test_bad_numbers_are_argument_errors(work, capsys, argv, words):
    """Each value used to reach torch (a traceback, or a silent run for --lr inf)."""
    out = work["root"] / "o.safetensors"
    quick = {
        "train": ["--checkpoint", str(work["dense"]), "--out", str(out), *LOOP_ARGS],
        "finetune": ["--checkpoint", str(work["dense"]), "--teacher", str(work["dense"]),
                     "--out", str(out), *LOOP_ARGS],
        "slim": ["--checkpoint", str(work["dense"]), "--out", str(out), *SLIM_ARGS, "--json"],
        "eval": ["--checkpoint", str(work["dense"]), "--json"],
    }[argv[0]]  # fmt: skip
    _refused(capsys, [*argv, "--data", str(work["images"]), *quick], *words)
    assert not out.exists()


def test_train_shift_larger_than_the_image(work, capsys):
    _refused(
        capsys,
        ["train", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
         "--out", str(work["root"] / "o.safetensors"), "--shift", "29", *LOOP_ARGS],
        "--shift 29", "image size",
    )  # fmt: skip


@pytest.mark.parametrize("device", ["bogus", "meta"])
def test_bench_bad_device(capsys, device):
    _refused(
        capsys,
        ["bench", "--device", device, "--models", "deit_tiny_patch16_224", "--batch", "1",
         "--repeats", "1"],
        "--device", device,
    )  # fmt: skip


def test_bench_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    _refused(
        capsys,
        ["bench", "--out", str(out), "--models", "deit_tiny_patch16_224", "--batch", "1",
         "--repeats", "1"],
        "--out", "not a directory",
    )  # fmt: skip
    assert out.read_text() == "x"


def test_config_that_is_not_json_names_the_file(tmp_path, capsys):
    path = tmp_path / "bad-config.safetensors"
    save_file(
        ps.VisionTransformer.from_config(TINY).state_dict(),
        path,
        metadata={"format": "patchslim-vit", "config": "{not json"},
    )
    with pytest.raises(ps.checkpoint.CheckpointError, match=r"bad-config\.safetensors"):
        load_model(path)
    _refused(capsys, ["flops", "--checkpoint", str(path)], "bad-config.safetensors")


def test_weights_that_describe_no_vit_name_the_file(tmp_path, capsys):
    path = tmp_path / "odd.pth"
    state = ps.VisionTransformer.from_config(TINY).state_dict()
    state["patch_embed.proj.weight"] = torch.zeros(32, 49)  # 2-D: cannot be unpacked
    torch.save(state, path)
    with pytest.raises(ps.checkpoint.CheckpointError, match=r"odd\.pth"):
        load_model(path)
    _refused(capsys, ["eval", "--checkpoint", str(path)], "odd.pth")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """A bug (here a ValueError from inside a command) is not a usage error."""

    def broken(args):
        raise ValueError("a bug")

    monkeypatch.setattr(commands, "_cmd_info", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["info"])


# --- 7. JSON, empty classes, pickles, slim --workers, --calib-size --------------------------


def test_json_output_is_strict_json(work, capsys):
    broken = _nan_in(work["dense"], work["root"] / "nan.safetensors", "head.bias")
    assert main(["eval", "--checkpoint", str(broken), "--data", str(work["images"]), "--json"]) == 0
    text = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    summary = json.loads(text, parse_constant=refuse)
    assert summary["loss"] is None and summary["images"] == 16


def test_empty_class_folder_is_an_error(work, capsys):
    images = _image_folder(work["root"] / "images")
    (images / "class1b").mkdir()
    (images / "class1b" / "notes.txt").write_text("no images here")
    _refused(
        capsys,
        ["eval", "--checkpoint", str(work["dense"]), "--data", str(images), "--json"],
        "class folder", "class1b", "holds no images",
    )  # fmt: skip


def test_pickle_refusal_is_one_line_without_torch_advice(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": print}, path)
    result = _run("eval", "--checkpoint", str(path))
    assert result.returncode == 2
    line = _one_error_line(result.stderr, "evil.pth", "pickle", "Unsupported global")
    assert "weights_only" not in line and "\x1b" not in line


def test_slim_has_no_workers_option(capsys, tmp_path):
    _refused(
        capsys,
        ["slim", "--out", str(tmp_path / "o.safetensors"), "--workers", "2"],
        "unrecognized arguments: --workers 2",
    )  # fmt: skip


def test_calib_size_above_the_data_takes_all_of_it(work, capsys):
    out = work["root"] / "o.safetensors"
    argv = ["slim", "--checkpoint", str(work["dense"]), "--data", str(work["images"]),
            "--out", str(out), "--calib-size", "17", "--eps", "0.5", "--block-epochs", "0",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "calibrating on all 16 images of the data (calib_size 17 asks for more)" in captured.err
    assert json.loads(captured.out)["keep_counts"][-1] == 1 and out.is_file()
