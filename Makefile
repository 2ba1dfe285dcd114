# Two entry points for a fresh machine:  `make repro`  and  `make test`.
# The venv is reused when it exists; it is rebuilt when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install compile repro test bench

# uv installs what pip would, from where pip would (.ci/pip_sources.py hands it pip's indexes, find-links and
# constraints), in a third of the time: a fresh venv here in 48 s instead of 153 s (torch 28 s instead of 70 s,
# the rest 20 s instead of 82 s), most of a CI run's install. Where uv cannot be installed, pip does it all.
# The sources are read first, on their own: a failed read must stop the install, not leave uv on PyPI alone.
INSTALL = if test -x $(VENV)/bin/uv; then \
	  sources=$$($(PY) .ci/pip_sources.py) && \
	  $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode --index-strategy unsafe-best-match \
	    $$sources $(1); \
	else $(PY) -m pip install -q $(1); fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv || echo 'uv could not be installed: pip installs everything' >&2
	# The build of torch this project is tested with, run on the CPU here; on a GPU machine install your CUDA
	# build first.
	$(call INSTALL,torch==2.14.1 torchvision==0.29.1)
	$(call INSTALL,-e '.[dev]')
	touch $(STAMP)

install: $(STAMP)

# Bytecode for the project's own modules. pip compiles what it installs, but not an editable
# project, and a Python run with PYTHONDONTWRITEBYTECODE=1 (as on this development machine) never
# caches one: every process compiled pipeline/ again (`import stages.fit`: 1.82 s median without, 1.74 s
# with, 6 interleaved runs; the suite starts hundreds of such processes).
# A module edited since is compiled in memory, as before; .dvcignore keeps these out of DVC's hashes.
compile: install
	$(PY) -m compileall -q pipeline stages tests benchmarks

repro: compile
	dvc repro
	layerscope summary

# Every benchmark, one after another (each writes benchmarks/results/<name>.json), then
# benchmarks/results/SUMMARY.md. Run it on a quiet machine: about an hour on 2 cores.
bench: compile
	$(PY) -m pip install -q -e '.[bench]'  # pytorch-ood, the peer of bench_peers
	dvc repro calibrate  # what bench_search, bench_guard and bench_peers read: data, model, store, detectors, thresholds
	python benchmarks/bench_startup.py
	python benchmarks/bench_extract.py
	python benchmarks/bench_search.py
	python benchmarks/bench_search.py --methods-cost
	python benchmarks/bench_scale.py
	python benchmarks/bench_guard.py
	python benchmarks/bench_peers.py
	python benchmarks/bench_load.py
	python benchmarks/summarize.py --out benchmarks/results/SUMMARY.md

# pytest exits 5 when it collected no test: that is a failure, not a pass.
# One worker per core (pytest-xdist); --dist loadscope keeps a module's tests, and its
# module-scoped project, on one worker. Each worker runs torch on one thread (tests/conftest.py).
# --no-loadscope-reorder keeps the order tests/conftest.py gives (the longest modules first);
# xdist would otherwise start the modules with the most tests first, and the longest one last.
test: compile
	pytest -n auto --dist loadscope --no-loadscope-reorder; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc
