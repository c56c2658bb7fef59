# flatlens: `make demo` (install + train + analyse on the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flatlens-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The demo: float ERM and 7-bit QAT on RotatedDigits (same seeds), their Hessians and loss landscapes,
# and the figures of the README gallery (docs/figures). About 3-4 minutes on 2 CPU cores.
DEMO_STEPS ?= 600
DEMO_SAMPLES ?= 256
FL := $(VENV)/bin/flatlens
demo: $(STAMP)
	$(FL) train --config experiments/erm_rotated_digits.toml --set train.steps=$(DEMO_STEPS) --out runs/demo/erm --overwrite
	$(FL) train --config experiments/qtdog_rotated_digits.toml --set train.steps=$(DEMO_STEPS) --out runs/demo/qat --overwrite
	$(FL) collect runs/demo
	for r in erm qat; do \
	  $(FL) sharpness runs/demo/$$r/model.pt --measures hessian,trace,density --k 3 --samples $(DEMO_SAMPLES) --trace-rtol 0.05 --density-probes 2 --density-steps 24 || exit 1; \
	  $(FL) landscape runs/demo/$$r/model.pt --dim 1 --range -0.5:0.5:21 --samples $(DEMO_SAMPLES) --quiet || exit 1; \
	  $(FL) landscape runs/demo/$$r/model.pt --dim 2 --range -0.5:0.5:11 --samples $(DEMO_SAMPLES) --quiet || exit 1; \
	done
	$(PY) figures/hessian_spectrum.py runs/demo/erm/analysis.h5 runs/demo/qat/analysis.h5 --labels "float ERM" "QAT 7-bit" --out docs/figures --format png
	$(PY) figures/landscape_1d.py runs/demo/erm/analysis.h5 --out docs/figures --format png
	$(PY) figures/landscape_2d.py runs/demo/erm/analysis.h5 --kinds contourf,surface --out docs/figures --format png
	$(PY) figures/compare.py runs/demo/erm/analysis.h5 runs/demo/qat/analysis.h5 --labels "float ERM" "QAT 7-bit" --out docs/figures --format png
	@echo "demo: runs in runs/demo/{erm,qat} (model.pt, results.jsonl, analysis.h5); figures in docs/figures"

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[oracle]"
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# a smoke run of every benchmark (about 2 minutes; its ratios mean nothing)
bench-quick: $(STAMP)
	$(PY) benchmarks/bench_qat.py --models mnist_cnn --repeats 1 --steps 2 --warmup 1
	$(PY) benchmarks/bench_hessian.py --quick
	$(PY) benchmarks/bench_eig_stop.py --quick
	$(PY) benchmarks/bench_landscape.py --quick
	$(PY) benchmarks/bench_journal.py --quick
	$(PY) benchmarks/bench_density.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
