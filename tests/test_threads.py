"""Thread counts from the cores actually free (pipeline/threads.py) and ``compute.threads``."""

import os
import subprocess
import sys
import time

import pytest
import torch

from pipeline import threads
from pipeline.config import ComputeConfig
from pipeline.errors import ConfigError

BUSY = "while True: pass"


@pytest.fixture
def restore_threads(monkeypatch):
    """use_threads changes process-wide state: put torch's pool, the env and the module's memory back."""
    before = torch.get_num_threads()
    for var in threads.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_STATE", {"chosen": None, "user_cap": None})
    yield
    torch.set_num_threads(before)


@pytest.fixture
def busy_machine():
    """One busy process per usable core: nothing is free however quiet the machine was."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(threads.usable_cores())]
    time.sleep(0.5)  # runnable, past the interpreter's start
    yield len(procs)
    for proc in procs:
        proc.kill()
        proc.wait()


def test_usable_cores_within_the_machine():
    assert 1 <= threads.usable_cores() <= os.cpu_count()


def test_a_busy_machine_leaves_one_thread(busy_machine):
    assert threads.busy_cores() >= busy_machine - 1  # the median of instant readings, our own thread excluded
    assert threads.available_threads() == 1


def test_an_int_is_used_as_given(restore_threads):
    assert threads.resolve(3) == 3
    assert threads.use_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert all(os.environ[var] == "1" for var in threads.ENV_VARS)
    assert threads.chosen() == 1


def test_omp_num_threads_caps_auto(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.use_threads("auto") == 1
    # the cap is the user's, not the value use_threads itself wrote into the environment
    os.environ["OMP_NUM_THREADS"] = "7"
    assert threads.resolve("auto") == 1


def test_auto_without_a_cap_takes_the_free_cores(restore_threads):
    n = threads.use_threads("auto")
    assert 1 <= n <= threads.usable_cores()
    assert torch.get_num_threads() == n


@pytest.mark.parametrize("value", [0, -2, 1.5, "many", True])
def test_compute_threads_is_validated(value):
    with pytest.raises(ConfigError, match=r"compute\.threads.*'auto' or a positive int.*Hint: 'auto' takes"):
        ComputeConfig(threads=value)


def test_the_cli_sizes_its_pools_before_the_work(busy_machine):
    """Every command starts by choosing its threads: with every core taken, one."""
    env = {k: v for k, v in os.environ.items() if k not in threads.ENV_VARS}
    out = subprocess.run([sys.executable, "-m", "pipeline", "-v", "methods"], capture_output=True, text=True,
                         env=env, check=True)
    assert "using 1 thread(s)" in out.stderr
