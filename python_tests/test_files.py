"""patchslim_ext.files.atomic_write: a complete file or the old one, never a partial
file left behind, and the mode any new file gets."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

import patchslim_ext as ps
from patchslim_ext import files
from patchslim_ext.files import atomic_write


def test_writes_the_file_through_a_partial_one(tmp_path):
    target = tmp_path / "out.json"
    written_to = []

    def write(partial):
        written_to.append(partial)
        assert not target.exists()  # nothing at the target until the write is complete
        partial.write_text("new")

    assert atomic_write(target, write) == target
    assert written_to == [tmp_path / "out.json.partial"]
    assert target.read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path, error):
    target = tmp_path / "out.json"
    target.write_text("old")

    def write(partial):
        partial.write_text("half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_failing_rename_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def refuse(source, destination):
        raise PermissionError(f"cannot rename {source}")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write(target, lambda partial: partial.write_text("new"))
    assert target.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_the_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync of the partial file, then the rename: a crash right after the rename
    cannot leave an empty target."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", str(source)))
        real_replace(source, destination)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file behind a descriptor")
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write(tmp_path / "out.bin", lambda partial: partial.write_bytes(b"data"))
    partial = str(tmp_path / "out.bin.partial")
    assert events[:2] == [("fsync", partial), ("replace", partial)]
    assert events[2:] == [("fsync", str(tmp_path))]  # the directory entry, after the rename


def test_a_private_file_gets_the_mode_of_any_new_file(tmp_path):
    """A writer that makes its file 0600 (as safetensors does): the result has the mode
    that open() gives a new file under the umask, 0644 under 022."""
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.bin", lambda partial: partial.chmod(0o600))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644


def test_a_saved_checkpoint_is_0644_under_umask_022(tmp_path):
    previous = os.umask(0o022)
    try:
        ps.save_model(ps.digits_vit(), tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_checkpoint_that_fails_to_write_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    ps.save_model(ps.digits_vit(), path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ps.weights, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        ps.save_model(ps.digits_vit(num_classes=3), path)
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]
    assert ps.load_model(path).config.num_classes == 10


def test_files_imports_no_torch():
    """The parser's modules may use it: it must not load torch."""
    code = "import sys, patchslim_ext.files; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
