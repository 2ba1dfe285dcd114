"""Kill a layerscope command at random points, many times: the harness behind ``tests/test_faults.py``.

Written for any command that builds one artifact directory (``extract`` and its
feature store today, ``fit`` and its detectors next): :func:`kill_campaign`
takes the command line and the artifact path, plus three small callables that
know the artifact (how far the run got, which phase a kill landed in, and what
every reader must say afterwards).

Each run is a real child process in its own process group, killed with
SIGKILL to that group, so nothing of it (``finally``, ``__exit__``, atexit)
runs. To afford 15-25 kills in about a minute, the children are forked from a
*zygote*: a Python process that has imported layerscope once (~10 s of torch,
torchvision and scikit-learn imports on a busy machine) and forks a child per
run, which calls the same CLI entry point (``pipeline.cli.app``) with the given
arguments and environment. Kills are of three kinds:

* ``timer``: after a random delay (lands wherever the run happens to be);
* ``progress``: as soon as the artifact's progress counter reaches a target;
* ``failpoint``: the child kills itself at a named point
  (``LAYERSCOPE_FAILPOINT``, see :func:`pipeline.artifacts.failpoint`): inside
  a publish or a chunk write, where a timer rarely lands.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# The zygote: imports the CLI once (and the modules named in its arguments), then forks one child per request
# line (JSON: argv, env, log). It answers "pid <n>" at once and "exit <status>" when the child ends (it reaps
# its children).
ZYGOTE = r"""
import importlib, json, os, sys
import pipeline.cli  # the expensive imports, once
for name in sys.argv[1:]:  # what the commands import lazily
    importlib.import_module(name)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group: the killer signals the group
        os.environ.update(req["env"])
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2)
        code = 1
        try:
            pipeline.cli.app(req["argv"], prog_name="layerscope")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    print(f"pid {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
"""


class Zygote:
    """A process that has imported layerscope and forks a child per :meth:`start` (a context manager).

    ``preload``: modules the commands import lazily, imported once in the zygote rather than in every child
    (for `fit`, PyOD's and skops' imports are two thirds of a run on a tiny store).
    """

    def __init__(self, cwd, env=None, preload=("stages.extract", "stages.fit")):
        self.cwd, self.env, self.preload = Path(cwd), env, list(preload)

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, *self.preload], cwd=self.cwd, env=self.env,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready", "the zygote could not import layerscope"
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def start(self, argv: list[str], env: dict, log: Path) -> int:
        """Fork a child running ``layerscope <argv>``; return its pid (also its process group)."""
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid", word
        return int(pid)

    def finished(self, timeout: float = 0.0) -> int | None:
        """The child's exit code if it has ended within ``timeout`` seconds, else None."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        word, code = self.proc.stdout.readline().split()
        assert word == "exit", word
        return int(code)


@dataclass
class Kill:
    """One planned kill: ``kind`` and its argument.

    ``("timer", seconds)``, ``("progress", n)`` (once ``n`` more units are done
    than at the start of the run), ``("failpoint", "name[@n]")`` or ``("none",)``.
    """

    kind: str
    arg: object = None


@dataclass
class Outcome:
    """One run: its planned kill, exit code (-9: killed), where it landed, how long it ran."""

    kill: Kill
    returncode: int
    phase: str
    seconds: float

    @property
    def landed(self) -> bool:
        return self.returncode == -signal.SIGKILL


@dataclass
class Campaign:
    outcomes: list = field(default_factory=list)

    @property
    def phases(self) -> Counter:
        """How many kills landed in each phase (runs that ended before their kill are not kills)."""
        return Counter(o.phase for o in self.outcomes if o.landed)

    def report(self) -> str:
        kinds = Counter(o.kill.kind for o in self.outcomes if o.landed)
        finished = sum(not o.landed for o in self.outcomes)
        lines = [f"{len(self.outcomes)} runs: {sum(kinds.values())} killed ({dict(kinds)}), {finished} finished "
                 "before their kill; kills by phase:"]
        lines += [f"  {phase:<40} {n}" for phase, n in sorted(self.phases.items())]
        lines += ["runs:"] + [f"  {o.kill.kind} {o.kill.arg}: {o.phase} ({o.seconds:.2f} s)" for o in self.outcomes]
        return "\n".join(lines)


def run_once(zygote: Zygote, argv, log: Path, kill: Kill, progress: Callable[[], int] | None = None,
             timeout: float = 120.0) -> int:
    """Run ``layerscope <argv>`` once, killing it as ``kill`` says; return its exit code (-9 when killed)."""
    env = {"LAYERSCOPE_FAILPOINT": str(kill.arg)} if kill.kind == "failpoint" else {"LAYERSCOPE_FAILPOINT": ""}
    start = time.monotonic()
    base = progress() if progress is not None else 0
    pid = zygote.start(argv, env, log)
    if kill.kind == "timer":
        code = zygote.finished(float(kill.arg))
    elif kill.kind == "progress":  # ``arg`` more units of progress than the run started with
        code = None
        while code is None and progress() - base < kill.arg and time.monotonic() - start < timeout:
            code = zygote.finished(0.002)
    else:  # a failpoint kills the child itself; "none" runs to the end
        code = zygote.finished(timeout)
    if code is None:
        with _suppress_gone():
            os.killpg(pid, signal.SIGKILL)
        code = zygote.finished(30)
    return code


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is ProcessLookupError  # it ended between the check and the kill


def kill_campaign(argv: list[str], artifact: Path, kills: list[Kill], *, zygote: Zygote, logs: Path,
                  progress: Callable[[], int], phase: Callable[[Path], str],
                  check: Callable[[Path], None], n_kills: int | None = None) -> Campaign:
    """Run ``layerscope <argv>`` (which writes ``artifact``) once per planned kill, checking after each.

    A run may end before its kill (a resumed run has less left to do); it
    counts as a run, not a kill. A failpoint that was not reached is planned
    once more, for the next run.

    Parameters
    ----------
    argv : list of str
        The command's arguments after ``layerscope``, e.g. ``["extract", "--out", ...]``.
    artifact : Path
        What the command writes.
    kills : list of Kill
        One run per kill, in order; each run resumes what the previous ones left.
    zygote : Zygote
        Where the children are forked from.
    logs : Path
        A directory for each run's output (``run-<i>.log``).
    progress : callable
        ``progress() -> int``: how far the artifact's build got (e.g. shards recorded), for ``progress`` kills.
    phase : callable
        ``phase(artifact) -> str``: the phase a kill landed in, from what is on disk; called after
        every run (a failpoint kill is reported at its failpoint, a run that ended as ``finished``).
    check : callable
        ``check(artifact)``: asserts that no reader accepts a partial artifact.
    n_kills : int, optional
        Stop once this many kills have landed.

    Returns
    -------
    Campaign
        Each run's kill, exit code and phase.
    """
    campaign, plan, retried = Campaign(), list(kills), set()
    logs.mkdir(parents=True, exist_ok=True)
    for i, kill in enumerate(plan):  # grows while iterating: an unreached failpoint comes again
        start = time.monotonic()
        code = run_once(zygote, argv, logs / f"run-{i}.log", kill, progress)
        if code not in (0, -signal.SIGKILL):
            raise AssertionError(f"run {i} ({kill}) failed with {code}:\n{(logs / f'run-{i}.log').read_text()}")
        where = phase(artifact)  # called after every run: it may keep state (e.g. leftovers already seen)
        if code == 0:
            where = "finished"
            if kill.kind == "failpoint" and kill.arg not in retried:
                retried.add(kill.arg)
                plan.insert(i + 1, kill)  # next: a finished run leaves a fresh start, where it is reached
        elif kill.kind == "failpoint":
            where = f"failpoint {str(kill.arg).partition('@')[0]}"
        campaign.outcomes.append(Outcome(kill, code, where, time.monotonic() - start))
        check(artifact)
        if n_kills is not None and sum(o.landed for o in campaign.outcomes) >= n_kills:
            break
    return campaign


def tree_bytes(directory: Path) -> dict:
    """Every file of a directory tree: relative path -> bytes (what "bit-identical" compares)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def differing(files: dict, reference: dict) -> list[str]:
    """The paths where two :func:`tree_bytes` maps disagree, each with how; ``[]`` when bit-identical.

    Compared as ``dict == dict``, a failure prints every file's bytes (a store's are megabytes)
    and the one path that differs is lost in them; this names it.
    """
    def why(path):
        if path not in reference:
            return "only in the first"
        if path not in files:
            return "only in the reference"
        a, b = files[path], reference[path]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{len(a)} vs {len(b)} bytes, first difference at byte {at}: {a[at:at + 60]!r} vs {b[at:at + 60]!r}"

    return [f"{path}: {why(path)}" for path in sorted(files.keys() | reference.keys())
            if files.get(path) != reference.get(path)]
