"""End to end, on a copy of the project ``test_e2e_dvc.py`` builds with `dvc repro`: reruns.

Queued `dvc exp` experiments rerun only `detect` (each restores the store from
the DVC cache), and a forced rerun, killed inside extract and resumed,
reproduces dvc.lock byte for byte. A module of its own so that pytest-xdist can
run it beside ``test_e2e_dvc.py``, on the same build (see
:func:`tests.test_e2e_dvc.built_project`): CI keeps one real `dvc repro` path.
"""

import json
import os
import re
import signal
import subprocess
import time

import psutil  # installed with DVC
import pytest

from tests.test_e2e_dvc import env, first_run, ran_stages, repo, run  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.e2e


def git_commit(repo, message):
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message], repo)


def test_dvc_experiments_rerun_only_detect_and_queue_restores_the_store(repo, first_run):
    git_commit(repo, "baseline after dvc repro")
    # a grid of two queued experiments (recall x percentile), run two at a time
    run(["dvc", "exp", "run", "--queue", "-S", "detect.recall=0.85,0.9", "-S", "detect.methods.scale.percentile=65"],
        repo)
    try:
        start_queue(repo, 2)
        status = wait_for_queue(repo, 2)
    finally:
        stop_workers(repo)
    assert status.count("Success") == 2, status
    # rows read "<task id>  <name>  <created, e.g. 02:55 PM>  Success"
    names = re.findall(r"^\s*[0-9a-f]+\s+(\S+)\s.*\bSuccess\s*$", status, flags=re.M)
    assert len(names) == 2, status
    for name in names:
        logs = run(["dvc", "queue", "logs", name], repo)
        assert ran_stages(logs) == {"detect"}, logs  # the store came from the DVC cache: no re-extraction
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, stderr=False))
    detects = [exp.get("data", {}).get("params", {}).get("params.yaml", {}).get("data", {}).get("detect", {})
               for exp in _experiments(shown)]
    assert {"0.85", "0.9"} <= {str(d.get("recall")) for d in detects}, detects
    assert any(d.get("methods", {}).get("scale", {}).get("percentile") == 65 for d in detects), detects
    # summary --exps reads the same records: one group per params set (no seeds vary here), FPR at each recall
    proc = subprocess.run(["layerscope", "summary", "--exps", "--method", "msp"], cwd=repo, capture_output=True,
                          text=True, env={**env(), "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    assert "3 runs in 3 groups" in proc.stdout and "detect.recall=0.85" in proc.stdout, proc.stdout
    assert "detect.recall=0.9" in proc.stdout and proc.stdout.count("msp") == 3, proc.stdout
    # the README's screen-sized `dvc exp show`
    proc = subprocess.run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", README_DROP, "--keep",
                           r"msp\.auroc"], cwd=repo, capture_output=True, text=True, env={**env(), "COLUMNS": "150"})
    assert proc.returncode == 0 and "msp.auroc_far" in proc.stdout and "…" not in proc.stdout, proc.stdout
    assert "knn.auroc" not in proc.stdout and "detect.recall" in proc.stdout, proc.stdout
    run(["git", "checkout", "-q", "--", "."], repo)


README_DROP = r"Created|State|Executor|.*:|recall|layer|.*\.(auroc|fpr)"  # README's `dvc exp show --drop`


def start_queue(repo, jobs):
    """`dvc queue start -j jobs`: it returns once its workers are spawned; their output goes to a file.

    The workers are daemons that keep the stdout and stderr they inherit. Given :func:`run`'s pipes, the call
    would last until the last worker exits, and forever when one never does: in a dvc-task race, a worker told
    to shut down (its queue looked empty) while it still ran a task can stay up after it, deaf to
    `dvc queue stop`.
    """
    with open(repo / ".dvc" / "tmp" / "queue-start.log", "w") as log:
        proc = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env(), stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        pytest.fail(f"dvc queue start failed ({proc.returncode}): see {log.name}")


def stop_workers(repo, timeout=60):
    """Stop the DVC processes still running in ``repo`` (its queue's workers) once the queue is done.

    SIGTERM is celery's warm shutdown: a worker still running a task finishes it first; after ``timeout``
    seconds, SIGKILL.
    """
    workers, ours = [], {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid not in ours and proc.info["cwd"] == os.path.realpath(repo) and "dvc" in cmd:
                proc.terminate()
                workers.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to see
            pass
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for proc in alive:
        proc.kill()


def wait_for_queue(repo, n, timeout=600):
    """`dvc queue status` once the queue is done: ``n`` experiments committed (their git refs), or one failed.

    Each `dvc queue status` costs about a second of CPU (DVC's imports), which the experiments need on a
    2-core machine: until ``n`` refs exist, it is asked only every 20 s (to stop at a failure).
    """
    deadline, asked = time.monotonic() + timeout, time.monotonic()
    while time.monotonic() < deadline:
        refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=repo,
                              capture_output=True, text=True).stdout.split()
        done = len(refs) >= n
        if done or time.monotonic() - asked > 20:
            status, asked = run(["dvc", "queue", "status"], repo), time.monotonic()
            if "Failed" in status or ("Queued" not in status and "Running" not in status):
                return status
        time.sleep(2 if done else 0.5)  # a committed experiment's task is marked done a moment later
    return run(["dvc", "queue", "status"], repo)


def _experiments(shown):
    """Every experiment record in `dvc exp show --json` output."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for revision in exp.get("revs") or []:
                yield revision


def test_outputs_are_byte_reproducible_through_a_forced_killed_and_resumed_run(repo, first_run):
    """Same inputs, same bytes: a forced rerun, killed inside extract and resumed, reproduces dvc.lock exactly.

    `dvc repro -f` reruns generate and train (identical outputs); the kill lands
    mid-store; a forced extract resumes its staging into the same bytes, so the
    lock is already the same (fit is up to date); forcing every later stage gives
    the same lock again. (Search, which reads only the store, reruns in
    :func:`tests.test_e2e_dvc.test_search_never_runs_the_network`, its files byte-compared.)
    """
    assert ran_stages(run(["dvc", "repro"], repo)) == set()  # whatever earlier tests changed is reproduced
    lock = (repo / "dvc.lock").read_text()
    progress = repo / "cache/.staging/features.zarr/progress.json"
    proc = subprocess.Popen(["dvc", "repro", "-f"], cwd=repo, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and count_shards(progress) < 5:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert count_shards(progress) >= 5 and not (repo / "cache/features.zarr").exists()
    # a plain `dvc repro` would check the identical store out of DVC's cache; forced, extract resumes its staging
    out = run(["dvc", "repro", "-f", "-s", "extract"], repo)
    assert ran_stages(out) == {"extract"} and "resuming staged store" in out
    # generate, train and the resumed store hash as before (the lock is unchanged): fit is up to date
    assert (repo / "dvc.lock").read_text() == lock
    assert "Data and pipelines are up to date" in run(["dvc", "status", "fit"], repo)
    later = ["fit", "detect", "calibrate", "guard"]
    assert ran_stages(run(["dvc", "repro", "-f", "-s", *later], repo)) == set(later)
    assert (repo / "dvc.lock").read_text() == lock


def count_shards(progress):
    try:
        return sum(len(v) for v in json.loads(progress.read_text())["splits"].values())
    except (FileNotFoundError, ValueError):
        return 0


