"""Benchmark of the default ``dvc repro`` under a competing CPU load.

Run from the repository root (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/bench_load.py                      # writes benchmarks/results/bench_load.json
    .venv/bin/python benchmarks/bench_load.py --baseline /tmp/before   # and another checkout, alternating
    .venv/bin/python benchmarks/bench_load.py --quick              # only `dvc repro train`, writes nothing

Each checkout's tracked files are copied into a fresh git + DVC project in a
temporary directory (its own DVC cache, the stages' code first on
``PYTHONPATH``), so nothing here touches this repository's outputs. There it
times the whole default pipeline twice, on the same code and params:

* ``quiet``: ``dvc repro -f`` from nothing (a fresh clone's first run, every
  stage forced: the copy's ``dvc.lock`` may match some stages' outputs);
* ``loaded``: ``dvc repro -f`` while this benchmark keeps ``--load`` other
  processes busy (pure Python loops, one core each), started before the run.

Goal (issue 18): ``loaded`` at most 2.5x ``quiet`` with one busy process on
this 2-core machine. The figures also give each stage's wall time (from dvc's
``Running stage`` lines) and the load average around every run; a run that
exceeds ``--timeout`` is stopped and recorded as such.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_load.json"
BUSY = "while True: pass"
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def copy_project(tree: Path, dest: Path) -> Path:
    """``tree``'s tracked files (as they are on disk) in a fresh git repository at ``dest``."""
    files = subprocess.run(["git", "-C", str(tree), "ls-files", "-z"], capture_output=True, check=True,
                           text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = tree / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def project_env(project: Path) -> dict:
    """The child environment: this venv's commands, ``project``'s code first on the path, no thread pins.

    ``layerscope`` is a shim running ``python -m pipeline``: the venv's console
    script names the entry point of the installed checkout, which an older
    checkout may not have.
    """
    shim = project / ".bench_bin"
    shim.mkdir(exist_ok=True)
    script = shim / "layerscope"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline "$@"\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["PATH"] = os.pathsep.join([str(shim), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(project)
    return env


def timed_repro(project: Path, argv: list[str], timeout: float) -> dict:
    """Wall time of one ``dvc repro`` and of each stage it ran; the command must succeed."""
    start = time.perf_counter()
    load_before = os.getloadavg()
    proc = subprocess.Popen(argv, cwd=project, env=project_env(project), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stages, current, last, tail = {}, None, start, []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            match = STAGE_LINE.search(line)
            if match:
                now = time.perf_counter()
                if current is not None:
                    stages[current] = round(now - last, 2)
                current, last = match.group(1), now
            if time.perf_counter() - start > timeout:
                proc.kill()
                break
        proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    seconds = time.perf_counter() - start
    if current is not None:
        stages[current] = round(time.perf_counter() - last, 2)
    timed_out = seconds >= timeout
    if proc.returncode != 0 and not timed_out:
        raise SystemExit(f"{' '.join(argv)} failed in {project} ({proc.returncode}):\n{''.join(tail)}")
    return {"seconds": round(seconds, 2), "timed_out": timed_out, "stages": stages,
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()]}


class CompetingLoad:
    """``n`` busy processes for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(self.n)]
        time.sleep(2.0)  # running before the pipeline starts, as a user's other job would be
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def measure(name: str, tree: Path, work: Path, args) -> dict:
    project = copy_project(tree, work / name)
    target = [args.target] if args.target else []
    print(f"[{name}] quiet: dvc repro -f {' '.join(target)}", flush=True)
    # forced, as the loaded run is: a copy whose dvc.lock matches its code would skip up-to-date stages
    quiet = timed_repro(project, ["dvc", "repro", "-f", *target], args.timeout)
    print(f"[{name}]   {quiet['seconds']:.1f} s  {quiet['stages']}", flush=True)
    print(f"[{name}] loaded ({args.load} busy): dvc repro -f {' '.join(target)}", flush=True)
    with CompetingLoad(args.load):
        loaded = timed_repro(project, ["dvc", "repro", "-f", *target], args.timeout)
    print(f"[{name}]   {loaded['seconds']:.1f} s{' (timed out)' if loaded['timed_out'] else ''}  "
          f"{loaded['stages']}", flush=True)
    return {"tree": str(tree), "commit": _commit(tree), "quiet": quiet, "loaded": loaded,
            "slowdown": round(loaded["seconds"] / quiet["seconds"], 2),
            "stage_slowdown": {s: round(loaded["stages"][s] / t, 2) for s, t in quiet["stages"].items()
                               if s in loaded["stages"] and t > 0}}


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a `git worktree` of the commit "
                        "before a change), measured the same way after this one")
    parser.add_argument("--load", type=int, default=1, help="busy processes during the loaded run [1]")
    parser.add_argument("--target", help="a dvc repro target (default: the whole pipeline)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop a run after this many seconds")
    parser.add_argument("--quick", action="store_true", help="only `dvc repro train`; prints, writes nothing")
    parser.add_argument("--only", choices=("code", "baseline"), help="measure one tree; with --out, the other's "
                        "run already in the file is kept")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.target = args.target or "train"
    trees = {"code": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    if args.only:
        trees = {args.only: trees[args.only]}
    start_load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_load_") as work:
        runs = {name: measure(name, tree, Path(work), args) for name, tree in trees.items()}
    if args.only and args.out.is_file():  # the other tree's run, measured by an earlier invocation
        runs = {**json.loads(args.out.read_text()).get("runs", {}), **runs}
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "loadavg_start": start_load,
                          "loadavg_end": os.getloadavg()},
              "config": {"load": args.load, "target": args.target or "(all)", "timeout": args.timeout,
                         "goal_max_slowdown": 2.5},
              "runs": runs}
    for name, run in runs.items():
        print(f"{name}: quiet {run['quiet']['seconds']:.1f} s, loaded {run['loaded']['seconds']:.1f} s "
              f"-> {run['slowdown']:.2f}x (goal <= 2.5x)")
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
