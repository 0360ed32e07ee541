"""The acceleration-report harness (patchslim bench): plans, baseline, timing fields."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import patchslim_ext as ps
from patchslim_ext import commands
from patchslim_ext.benchmark import (
    NOISY_SPREAD,
    PAPER_FLOP_REDUCTION,
    TABLE_HEADERS,
    BenchRow,
    compare,
    describe_machine,
    forward_seconds,
    peak_memory_bytes,
    pyramid_plan,
    relative_spread,
    significant,
    table_row,
    torch_slimmed_forward,
)
from patchslim_ext.cli import main
from patchslim_ext.vit import MODEL_FACTORIES

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.parametrize("name", sorted(PAPER_FLOP_REDUCTION))
def test_pyramid_plans_match_the_paper(name):
    config = MODEL_FACTORIES[name]().config
    plan = pyramid_plan(config, PAPER_FLOP_REDUCTION[name])
    reduction = 1 - ps.flops_of(config, plan.keep_counts) / ps.flops_of(config)
    assert abs(reduction - PAPER_FLOP_REDUCTION[name]) < 0.0005  # the paper's 0.1% rounding
    counts = plan.keep_counts
    assert counts[0] == config.num_tokens and counts[-1] == 1
    assert list(counts) == sorted(counts, reverse=True)  # a pyramid


def test_unreachable_reduction_is_refused():
    with pytest.raises(ValueError, match="out of reach"):
        pyramid_plan(ps.digits_vit().config, 0.99)


def test_torch_baseline_computes_the_slimmed_model():
    torch.manual_seed(0)
    model = ps.digits_vit().eval()
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(49) + 1])
    plan = ps.SlimPlan(order, [50, 44, 40, 33, 30, 21, 18, 12, 9, 5, 2, 1])
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            torch_slimmed_forward(model, plan, images), copy.deepcopy(model).set_plan(plan)(images),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_compare_row_is_consistent():
    torch.manual_seed(0)
    model = ps.digits_vit()
    plan = pyramid_plan(model.config, 0.45)
    row = compare("digits_vit", model, plan, batch=4, repeats=3)
    assert row.dense_flops == ps.flops_of(model.config)
    assert row.slim_flops == ps.flops_of(model.config, plan.keep_counts)
    assert row.dense_ms > 0 and row.slim_ms > 0 and row.torch_slim_ms > 0
    assert row.dense_peak_mb > 0 and row.slim_peak_mb > 0
    record = row.to_dict()
    assert record["ratio"] == pytest.approx(record["time_reduction"] / record["flop_reduction"])
    assert len(table_row(row)) == len(TABLE_HEADERS)
    assert 0 <= row.spread == max(row.dense_spread, row.slim_spread, row.torch_slim_spread)


def test_peak_memory_counts_the_live_intermediates():
    weight = torch.randn(256, 256)
    # Two live 1024x256 float32 results (1 MiB each) at the peak.
    peak = peak_memory_bytes(lambda x: (x @ weight) + (x @ weight).sum(), torch.randn(1024, 256))
    assert 2 * 2**20 <= peak <= 2.1 * 2**20


def test_peak_memory_needs_no_profiler():
    with torch.profiler.profile(), pytest.raises(RuntimeError, match="under a profiler"):
        peak_memory_bytes(lambda x: x + 1, torch.randn(4))


def test_timing_rotates_inputs():
    seen = []
    batches = [torch.full((1,), float(i)) for i in range(3)]
    times = forward_seconds(lambda x: seen.append(int(x.item())), batches, repeats=6, warmup=0)
    assert seen == [0, 1, 2, 0, 1, 2] and len(times) == 6


def test_relative_spread():
    assert relative_spread([0.1]) == 0.0
    assert relative_spread([2.0] * 5) == 0.0
    # Deciles of 1..11 (inclusive): 2 and 10, median 6.
    assert relative_spread([float(value) for value in range(11, 0, -1)]) == pytest.approx(8 / 6)
    # One slow run of five moves the 90th percentile, not the median.
    assert relative_spread([1.0, 1.0, 1.0, 1.0, 3.0]) == pytest.approx(1.2)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.30612, "0.306"), (0.3, "0.300"), (21.94, "21.9"), (564.1, "564"), (7000.1, "7000"),
     (9.996, "10.0"), (0.0, "0"), (-1.2345, "-1.23")],
)  # fmt: skip
def test_significant_digits(value, text):
    assert significant(value) == text


def test_readme_table_has_the_bench_columns():
    """The README's Table 2 and ``patchslim bench`` print the same columns."""
    section = README.read_text(encoding="utf-8").split("## Practical acceleration", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("| model |"))
    assert tuple(cell.strip() for cell in header.strip("|").split("|")) == TABLE_HEADERS


def _row(spreads: tuple[float, float, float], model: str = "deit_tiny_patch16_224") -> BenchRow:
    """A row with made-up timings (no model is run)."""
    dense_spread, slim_spread, torch_slim_spread = spreads
    return BenchRow(
        model=model, device="cpu", dtype="float32", batch=1, cuda_graphs=False,
        keep_counts=[197, 100, 1], dense_flops=1_258_000_000, slim_flops=677_000_000,
        dense_ms=21.94, slim_ms=14.2, torch_slim_ms=15.9, dense_spread=dense_spread,
        slim_spread=slim_spread, torch_slim_spread=torch_slim_spread, dense_peak_mb=1.7,
        slim_peak_mb=1.0,
    )  # fmt: skip


def test_table_row_formats_significant_digits():
    cells = dict(zip(TABLE_HEADERS, table_row(_row((0.05, 0.031, 0.0))), strict=True))
    assert cells["device, dtype"] == "CPU fp32"
    assert cells["GFLOPs dense → slim"] == "1.26 → 0.677"
    assert cells["ms dense → slim"] == "21.9 → 14.2"
    assert cells["spread"] == "5.0%"
    assert cells["img/s dense → slim"] == "45.6 → 70.4"


def test_noisy_rows_are_those_beyond_the_limit():
    assert not _row((NOISY_SPREAD, 0.0, NOISY_SPREAD)).noisy
    assert _row((0.0, 0.0, 1.5 * NOISY_SPREAD)).noisy


@pytest.fixture
def quiet_machine(monkeypatch):
    """No oversubscription warning, whatever else runs on the machine: the tests that
    read stderr see only what they look for."""
    monkeypatch.setattr(commands, "oversubscription_warning", lambda: None)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_warns_when_timings_spread(monkeypatch, capsys, quiet_machine):
    rows = [_row((0.02, 0.03, 0.01)), _row((0.02, 0.48, 0.01), model="deit_small_patch16_224")]
    monkeypatch.setattr(commands, "run_benchmarks", lambda *args, **kwargs: rows)
    assert main(["bench", "--repeats", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("deit_") == 2  # the table, on stdout
    (warning,) = captured.err.splitlines()
    assert warning.startswith("warning: ") and "1 of 2 rows" in warning and "48%" in warning
    assert "--threads 1" in warning and "--repeats" in warning


def test_bench_is_quiet_when_timings_agree(monkeypatch, capsys, quiet_machine):
    monkeypatch.setattr(
        commands, "run_benchmarks", lambda *args, **kwargs: [_row((0.02, 0.03, 0.01))]
    )
    assert main(["bench"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("native", [False, True])
def test_bench_warns_when_bf16_is_emulated(monkeypatch, capsys, quiet_machine, native):
    monkeypatch.setattr(
        commands, "run_benchmarks", lambda *args, **kwargs: [_row((0.02, 0.03, 0.01))]
    )
    monkeypatch.setattr(commands, "cpu_has_native_bf16", lambda: native)
    assert main(["bench", "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert ("no native bfloat16" in err) != native
    assert main(["bench", "--dtype", "float32"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("before", "asked"), [(2, 1), (1, 2)])
def test_bench_times_with_the_threads_asked(monkeypatch, capsys, restore_threads, before, asked):
    """--threads, as for train/slim/finetune/eval/demo: the timings run with that many
    threads, and the oversubscription check runs first, its warning on stderr."""
    seen = []

    def run_benchmarks(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return [_row((0.02, 0.03, 0.01))]

    checked = []

    def oversubscription_warning():
        checked.append(torch.get_num_threads())
        return "the machine looks oversubscribed"

    monkeypatch.setattr(commands, "run_benchmarks", run_benchmarks)
    monkeypatch.setattr(commands, "oversubscription_warning", oversubscription_warning)
    torch.set_num_threads(before)
    assert main(["bench", "--threads", str(asked)]) == 0
    assert seen == checked == [asked]
    assert capsys.readouterr().err == "patchslim: warning: the machine looks oversubscribed\n"


def test_bench_threads_must_be_positive(capsys):
    assert main(["bench", "--threads", "0"]) == 2
    assert capsys.readouterr().err == (
        "patchslim: error: argument --threads: must be a positive integer, got 0\n"
    )


def test_bench_command(tmp_path, capfd):
    args = ["bench", "--models", "deit_tiny_patch16_224", "--batch", "1", "--repeats", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    captured = capfd.readouterr()  # file descriptors: kineto logs from C++
    (row,) = json.loads((tmp_path / "bench.json").read_text())
    assert row["model"] == "deit_tiny_patch16_224" and row["batch"] == 1
    assert row["flop_reduction"] == pytest.approx(0.462, abs=5e-4)
    assert row["spread"] >= 0
    assert (tmp_path / "bench.md").read_text().count("deit_tiny_patch16_224") == 1
    assert captured.out.count("deit_tiny_patch16_224") == 1
    # On stderr (not a terminal here) at most the spread and oversubscription warnings:
    # no profiler log lines, no progress bar.
    warnings = ("warning: ", "patchslim: warning: ")
    assert all(line.startswith(warnings) for line in captured.err.splitlines())


def test_bench_command_json(capsys):
    args = ["bench", "--models", "deit_tiny_patch16_224", "--batch", "1", "--repeats", "2"]
    assert main([*args, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["dense_ms"] > 0 and row["dense_spread"] >= 0


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, "glibc malloc (default settings)"),
        (
            {"MALLOC_TRIM_THRESHOLD_": "1", "MALLOC_MMAP_THRESHOLD_": "2"},
            "glibc malloc (MALLOC_MMAP_THRESHOLD_=2 MALLOC_TRIM_THRESHOLD_=1)",
        ),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
            "glibc malloc (GLIBC_TUNABLES=glibc.malloc.trim_threshold=1)",
        ),
        (
            {"LD_PRELOAD": "/usr/lib/libfoo.so /usr/lib/libjemalloc.so.2"},
            "allocator libjemalloc.so.2 (LD_PRELOAD)",
        ),
    ],
)
def test_machine_line_names_the_allocator(monkeypatch, environment, expected):
    """The allocator decides whether freed buffers are page-faulted in again on every
    call, so benchmark headers say which one ran."""
    for key in list(os.environ):
        if key in ("LD_PRELOAD", "GLIBC_TUNABLES") or key.startswith("MALLOC_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert describe_machine("cpu").endswith(expected)
