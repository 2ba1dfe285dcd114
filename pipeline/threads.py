"""How many threads the numeric libraries may use: the cores this process can actually get.

torch's OpenMP pool, the BLAS under numpy and scikit-learn, Dask's threaded
scheduler and our own task pools each size themselves to ``os.cpu_count()``.
That is right on an idle machine and ruinous on a busy one: a parallel region
ends only when its slowest thread does, and a thread that shares its core with
another process waits a whole scheduler time slice (milliseconds) for every
small operation. On 2 cores with one other busy process, a tiny model's
training then ran twenty times slower instead of twice.

So every command sizes its pools once, at start, from the cores that are free
*now*: the CPUs this process may run on (its affinity and its cgroup's quota)
minus the tasks other processes keep runnable. ``compute.threads`` in
``params.yaml`` overrides the count (``auto`` by default), and an explicit
``OMP_NUM_THREADS`` caps it. Nothing here changes a result: reductions are
computed the same way whatever the thread count (the tests check bit-identity),
so ``compute`` stays out of every stage's DVC dependencies. Training is the
exception: a backward pass sums gradients and batch statistics in one chunk
per thread, so the weights it learns depend on the count. The two trainings
(the backbone in ``train``, the heatmap decoder in ``fit``) therefore run on
a fixed count of their own, ``train.threads`` and ``fit.heatmap.threads``
(:func:`torch_threads`): tracked parameters, like any other that changes a
result, and 1 by default, the count every machine has free.

This module imports nothing heavy: the CLI calls it before torch is loaded, so
the environment variables it sets are the ones the libraries read at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import time

log = logging.getLogger(__name__)

# read once, when each library loads its thread pool
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_MAX_THREADS",
            "VECLIB_MAXIMUM_THREADS", "DASK_NUM_WORKERS")
USER_CAP = "OMP_NUM_THREADS"
# what this module last chose, so that a later call (a stage's own ``compute.threads``) knows the user's cap
_STATE: dict = {"chosen": None, "user_cap": None}


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, bounded by its cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota)) if quota else max(1, cores)


def _cgroup_quota() -> int | None:
    """``cpu.max`` of a cgroup-v2 container, rounded up to whole cores (None: no quota or not readable)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def busy_cores(samples: int = 5, interval: float = 0.004) -> int:
    """Tasks other processes keep runnable right now (the median of a few instant readings).

    ``procs_running`` in ``/proc/stat`` counts runnable threads system-wide at
    the instant of reading, this reading thread included; the median of a few
    readings a few milliseconds apart ignores a process that merely flickers.
    The one-minute load average would not do: it lags a load that started
    seconds ago, which is exactly the case of pipelines started together.
    """
    readings = []
    for i in range(samples):
        running = _procs_running()
        if running is None:
            return _loadavg_busy()
        readings.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval)
    return int(statistics.median(readings))


def _procs_running() -> int | None:
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _loadavg_busy() -> int:
    try:
        return round(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def available_threads() -> int:
    """Threads worth running now: usable cores minus busy ones, at least 1."""
    usable = usable_cores()
    return max(1, usable - min(busy_cores(), usable))


def resolve(threads="auto") -> int:
    """The thread count for ``compute.threads``: an int as given, ``"auto"`` as :func:`available_threads`.

    An ``OMP_NUM_THREADS`` the user set caps ``auto`` (it is how people pin a
    job's threads on shared machines).
    """
    if threads != "auto":
        return int(threads)
    n = available_threads()
    cap = _STATE["user_cap"] if _STATE["chosen"] is not None else _user_cap()
    return min(n, cap) if cap else n


def _user_cap() -> int | None:
    value = os.environ.get(USER_CAP, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def use_threads(threads="auto") -> int:
    """Size every thread pool of this process to ``threads`` (see :func:`resolve`); returns the count.

    Sets the environment variables that libraries read when they load (and
    that child processes inherit), then resizes the pools already loaded:
    torch's intra-op pool and, through threadpoolctl, BLAS and OpenMP.
    """
    if _STATE["chosen"] is None:
        _STATE["user_cap"] = _user_cap()
    n = resolve(threads)
    _STATE["chosen"] = n
    for var in ENV_VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "threadpoolctl" in sys.modules or "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    if "dask" in sys.modules:
        sys.modules["dask"].config.set(num_workers=n)
    log.debug("using %d thread(s) (%d usable cores)", n, usable_cores())
    return n


def chosen() -> int:
    """The count :func:`use_threads` chose in this process (or what it would choose now)."""
    return _STATE["chosen"] or resolve("auto")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op pool at exactly ``n`` threads inside; as it was, after.

    For training only (see the module's docstring): the same ``n`` gives the
    same weights on any machine, busy or not, whatever ``compute.threads``
    chose for the rest of the stage.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
