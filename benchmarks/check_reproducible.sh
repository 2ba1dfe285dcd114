#!/usr/bin/env bash
# Byte-reproducibility on the default data (issue 14), as a new user meets it:
#   1. a fresh clone's `dvc repro` reproduces the committed dvc.lock and leaves `git status` clean;
#   2. a second, forced `dvc repro -f` of the same commit gives the identical dvc.lock again.
# Too slow for the test suite (two full default runs, about 7 minutes on 2 cores); the suite
# checks the same property on the shrunk pipeline (tests/test_e2e_dvc.py).
#
#   benchmarks/check_reproducible.sh            # uses ./.venv; VENV=/path/to/venv to override
set -euo pipefail
src=$(git rev-parse --show-toplevel)
venv=${VENV:-$src/.venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/clone"
cd "$work/clone"
# the clone's own code, with the project's venv (no second 6 GB install)
export PATH="$venv/bin:$PATH" PYTHONPATH="$work/clone"

status=0
start=$(date +%s)
dvc repro >"$work/first.log" 2>&1 || { tail -20 "$work/first.log"; exit 1; }
echo "fresh clone: dvc repro took $(( $(date +%s) - start )) s"
if [ -n "$(git status --porcelain)" ]; then
  echo "NOT reproducible: git status after dvc repro on a fresh clone:"
  git status --porcelain
  git --no-pager diff --stat
  status=1
else
  echo "ok: git status is clean (dvc.lock and every tracked report equal the committed ones)"
fi
cp dvc.lock "$work/first.lock"
start=$(date +%s)
dvc repro -f >"$work/second.log" 2>&1 || { tail -20 "$work/second.log"; exit 1; }
echo "dvc repro -f took $(( $(date +%s) - start )) s"
if diff -u "$work/first.lock" dvc.lock; then
  echo "ok: dvc repro -f reproduced the identical dvc.lock"
else
  echo "NOT reproducible: dvc repro -f changed dvc.lock (diff above)"
  status=1
fi
exit $status
