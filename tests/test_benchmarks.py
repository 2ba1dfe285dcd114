"""The benchmark scripts' cheap paths (issue 18): ``summarize.py`` over the results, ``bench_peers.py --help``,
the guard's time breakdown on the tiny model.

The benchmarks themselves are not run here (minutes each, and timings are not
tests); these check that ``make bench``'s summary covers every results file and
that the peer benchmark starts without its optional dependency being imported,
and that the guard benchmark's breakdown times what it says it times.
"""

import importlib.util
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_guard import cached  # noqa: F401  (the fixture: the tiny store, Mahalanobis fitted on it)

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"


def run(*args):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def entries(text):
    """``{file name: its heading line}`` of a summary."""
    return {line.split("`")[1]: line for line in text.splitlines() if line.startswith("- `")}


def test_summary_has_an_entry_for_every_results_file():
    text = run(BENCHMARKS / "summarize.py")
    present = sorted(p.name for p in RESULTS.glob("*.json"))
    assert present, "benchmarks/results holds no JSON"
    found = entries(text)
    for name in present:
        assert name in found and "absent" not in found[name], f"no summary entry for {name}:\n{text}"
        assert "not readable" not in text.split(found[name])[1].split("\n- `")[0], text


def test_summary_notes_absent_files_and_reads_unknown_ones(tmp_path):
    shutil.copy(RESULTS / "bench_startup.json", tmp_path)
    (tmp_path / "bench_new.json").write_text(json.dumps({"date": "2026-12-06T12:00:00", "slowdown": 2.5,
                                                         "load_average": {"before": [1, 1, 1], "after": [2, 1, 1]}}))
    out = tmp_path / "SUMMARY.md"
    text = run(BENCHMARKS / "summarize.py", "--results", tmp_path, "--out", out)
    found = entries(text)
    assert "absent, skipped" in found["bench_peers.json"]
    assert "load 1.00 -> 2.00" in found["bench_new.json"] and "slowdown = 2.5" in text
    assert out.read_text() == text


def test_bench_peers_help_runs():
    text = run(BENCHMARKS / "bench_peers.py", "--help")
    assert "--quick" in text and "--repeats" in text and "pytorch-ood" in text


def test_bench_peers_without_pytorch_ood_says_how_to_install(monkeypatch):
    check_peer = runpy.run_path(str(BENCHMARKS / "bench_peers.py"))["check_peer"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'"):
        check_peer()


def test_the_guard_breakdown_times_each_piece_and_leaves_the_guard_module_as_it_was(tiny_model, tiny_splits, cached,
                                                                                      monkeypatch):
    import pipeline.guard as guard_module
    from pipeline.extract import pool
    from pipeline.guard import Guard
    from tests.test_guard import LAYERS, _midway

    work_breakdown = runpy.run_path(str(BENCHMARKS / "bench_guard.py"))["work_breakdown"]
    store, detectors = cached
    guard = Guard(tiny_model, detectors, dict(zip(LAYERS, _midway(store, detectors))), (1, 8, 8))
    monkeypatch.setattr(guard_module, "DROP_FLOPS", 0.0)  # the tiny model's rows are cheap: drop them anyway
    x = torch.from_numpy(tiny_splits["noise_test"].images)
    compact = guard_module._compact
    got = work_breakdown(guard, x, len(x), calls=3)
    assert guard_module.pool is pool and guard_module._compact is compact
    exits, flops = guard(x).exit_layer, guard.block_flops()
    assert 0 < (exits >= 0).sum() < len(x)
    spent = np.where(exits >= 0, flops[np.maximum(exits, 0)], flops[-1])
    assert got["flops_saved"] == round(float(1 - spent.mean() / flops[-1]), 6) > 0
    assert got["saving_at_most_ms"] == round(got["plain_ms"] * got["flops_saved"], 3)
    # layer1 pooled on its own; layer2's pooled rows are the network's global pooling, counted with it
    assert min(got[f"{k}_ms"] for k in ("network", "pooling", "scoring", "drops")) > 0
    pieces = sum(got[f"{k}_ms"] for k in ("pooling", "scoring", "drops", "rest"))
    assert abs(got["own_work_ms"] - pieces) < 1e-2
    assert work_breakdown(guard, x, len(x) + 1, calls=1) is None  # no full batch to time


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_bench_guard_refuses_a_breakdown_of_no_calls_in_one_line(value, capsys):
    parse_args = runpy.run_path(str(BENCHMARKS / "bench_guard.py"))["parse_args"]
    with pytest.raises(SystemExit, match="2"):
        parse_args(["--breakdown-calls", value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f": error: argument --breakdown-calls: expected an integer >= 1, got '{value}'")  # prog: argv[0]
