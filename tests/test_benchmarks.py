"""The benchmark scripts' cheap paths (issue 18): ``summarize.py`` over the results, ``bench_peers.py --help``.

The benchmarks themselves are not run here (minutes each, and timings are not
tests); these check that ``make bench``'s summary covers every results file and
that the peer benchmark starts without its optional dependency being imported.
"""

import importlib.util
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
