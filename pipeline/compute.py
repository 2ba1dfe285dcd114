"""Where the heavy work runs: this process's threads, a LocalCluster, or an existing Dask cluster.

The ``compute`` params section (:class:`~pipeline.config.ComputeConfig`) picks one:

* ``scheduler: threads`` (default): a thread pool in this process.
* ``scheduler: local``: a ``dask.distributed.LocalCluster`` of ``n_workers``
  processes, started and stopped by the stage.
* ``scheduler: tcp://host:8786``: an existing cluster (``dask scheduler`` and
  ``dask worker tcp://host:8786``). ``DASK_SCHEDULER_ADDRESS`` selects one too
  when the params say ``threads``.

One code path serves all three. Work is a list of independent tasks submitted to
a :class:`concurrent.futures.Executor`: a local pool, or the distributed client's
executor. Inside a task, large arrays are read from the store's dask arrays one
block at a time. A tqdm bar counts finished tasks, and a distributed client's
dashboard link is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, as_completed, wait

from tqdm.auto import tqdm

from pipeline import threads as _threads
from pipeline.config import ADDRESS_SCHEMES, ComputeConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# loky's reusable pool replaces a worker whose memory grew (its leak check) and
# resubmits that worker's pending tasks itself; its UserWarning about it says
# nothing a user can act on, and every search printed it.
warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given to the executor",
                        category=UserWarning)

ENV_ADDRESS = "DASK_SCHEDULER_ADDRESS"
CONNECT_TIMEOUT = "10s"


def scheduler_address(cfg: ComputeConfig) -> str | None:
    """The address of an existing scheduler to use, or None (threads or a LocalCluster)."""
    if cfg.scheduler.startswith(ADDRESS_SCHEMES):
        return cfg.scheduler
    if cfg.scheduler == "threads":
        return os.environ.get(ENV_ADDRESS) or None
    return None


class Runner:
    """Submits tasks to threads or to a Dask cluster, with a progress bar.

    Parameters
    ----------
    client : distributed.Client or None
        None runs tasks on a thread pool in this process.
    threads : int or None
        Size of that thread pool (None: the threads :mod:`pipeline.threads`
        chose for this process, i.e. the cores free when it started).
    """

    def __init__(self, client=None, threads=None):
        self.client = client
        self.threads = threads

    @property
    def distributed(self) -> bool:
        return self.client is not None

    def executor(self, threads=None, processes=False):
        """A ``concurrent.futures`` executor: the client's, or a local pool of ``threads`` workers.

        ``processes`` makes the local pool loky's reusable process pool (what
        joblib uses) for GIL-bound Python work; a cluster is processes anyway.
        """
        if self.client is not None:
            return self.client.get_executor(pure=False)
        if processes:
            from joblib.externals.loky import get_reusable_executor

            workers = threads or self.threads or _threads.chosen()
            # one BLAS thread per worker process, as joblib does: n processes x n BLAS threads oversubscribe
            blas = {var: "1" for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
            return contextlib.nullcontext(get_reusable_executor(max_workers=workers, env=blas))
        return ThreadPoolExecutor(max_workers=threads or self.threads or _threads.chosen())

    def map_unordered(self, fn, items, *, desc, unit="task", threads=None, processes=False):
        """Yield ``(item, fn(item))`` as tasks finish (any order).

        The first failure cancels the tasks not yet started and is raised; the
        results already yielded stay valid (callers record them as they come,
        which is what makes an interrupted run resumable).

        Parameters
        ----------
        fn : callable
            Picklable (it may run in another process), taking one item.
        items : list
        threads : int, optional
            Local pool size for this call (e.g. 1 for work that shares one
            torch model). Ignored on a cluster, where each worker has its own.
        processes : bool
            Run local tasks in processes (see :meth:`executor`).
        """
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, unit=unit, disable=None)
        with self.executor(threads, processes) as pool, bar:
            futures = {pool.submit(fn, item): item for item in items}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    bar.update(1)
                    yield futures[future], result
            except BaseException:
                for future in futures:
                    future.cancel()
                wait(futures, return_when=FIRST_EXCEPTION)
                raise


@contextlib.contextmanager
def open_runner(cfg: ComputeConfig | None = None):
    """A :class:`Runner` for ``cfg``; starts (and stops) a LocalCluster or connects to a scheduler.

    Sizes this process's thread pools to ``cfg.threads`` first (see :mod:`pipeline.threads`).

    Raises
    ------
    ConfigError
        The scheduler at the configured address cannot be reached.
    """
    cfg = cfg or ComputeConfig()
    _threads.use_threads(cfg.threads)
    address = scheduler_address(cfg)
    if cfg.scheduler == "local":
        with _local_client(cfg) as client:
            yield Runner(client)
    elif address is not None:
        with _remote_client(address) as client:
            yield Runner(client)
    else:
        yield Runner(None)


@contextlib.contextmanager
def _local_client(cfg):
    from distributed import Client, LocalCluster

    dashboard = ":0" if cfg.dashboard else None
    with LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                      memory_limit=cfg.memory_limit, dashboard_address=dashboard) as cluster, \
            Client(cluster) as client:
        _announce(client, f"LocalCluster of {cfg.n_workers} workers")
        yield client


@contextlib.contextmanager
def _remote_client(address):
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"Could not connect to the Dask scheduler at {address!r} ({type(exc).__name__}). "
                          f"Hint: start one with `dask scheduler`, workers with `dask worker {address}`, or set "
                          f"compute.scheduler: threads (and unset {ENV_ADDRESS}).") from None
    with client:
        _announce(client, f"scheduler {address}")
        yield client


def _announce(client, what):
    workers = len(client.scheduler_info().get("workers", {}))
    link = client.dashboard_link if client.dashboard_link else "no dashboard"
    log.info("computing on %s (%d workers); dashboard: %s", what, workers, link)
