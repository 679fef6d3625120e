# Set-up and entry points. Every target is idempotent: a second run reuses the venv.
#   make demo   set up, then run the main job (agent + collector on loopback, report at the end)
#   make test   set up, then run the whole test suite
#   make quick  the test suite without the slow end-to-end tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: this machine's pip finds the 2.13.0 CPU wheel locally, while an
# unpinned torch pulls a multi-GB CUDA build. The package itself only asks for a range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.grokwatch-installed
# Training frameworks whose worked examples (examples/) the tests run, each in a subprocess with this
# folder on its path: pinned and without their dependencies (torchtitan's own pull datasets, wandb,
# tensorboard...; triton is its import-time need, even on CPU), kept out of the venv's site-packages.
FRAMEWORKS := $(VENV)/frameworks
FRAMEWORK_PINS := megatron-core==0.16.1 torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser==0.18.0 triton==3.9.0 ai2-olmo-core==3.0.0 dataclass-extensions==0.5.0 bettermap==1.3.1 dill==0.4.1

.PHONY: setup frameworks demo test quick lint typecheck prometheus bench gpu-wheels k8s-rules k8s-keys clean

setup: $(STAMP)

# The editable install is a link tree (editable_mode=strict): a module added or removed needs it again,
# so the package folders (whose mtimes change then) are prerequisites too.
$(STAMP): pyproject.toml agent wire collector grokwatch grokwatch/demo
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	# strict: a link tree in build/ that every tool resolves (type checkers, editors), not an import hook.
	$(PY) -m pip install -q -e ".[agent,hf,collector,report,tensorboard,wandb,dev]" --config-settings editable_mode=strict
	touch $@

frameworks: $(FRAMEWORKS)/.installed

$(FRAMEWORKS)/.installed: $(STAMP) Makefile
	rm -rf $(FRAMEWORKS)
	$(PY) -m pip install -q --no-deps --target $(FRAMEWORKS) $(FRAMEWORK_PINS)
	touch $@

# The real Prometheus binary (Debian's package) for the integration tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

demo: setup
	$(VENV)/bin/grokwatch demo

test: setup frameworks prometheus lint typecheck
	$(PY) -m pytest

# ruff (pyproject's [tool.ruff.lint]) on the package's folders: zero findings.
lint: setup
	$(VENV)/bin/ruff check wire collector agent grokwatch

# basedpyright (pyrightconfig.json: basic) on all four packages: zero errors.
typecheck: setup
	$(VENV)/bin/basedpyright wire collector agent grokwatch

quick: setup frameworks
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) bench/collector_throughput.py
	$(PY) bench/edit_distance.py
	$(PY) bench/agent_overhead.py

# What bench/gpu_check.sh needs on a device machine that has no package index: the one dependency its
# image lacks (pyzmq), as a wheel for its Python 3.12, in the git-ignored .whl/ that run(carry=[".whl"]) takes.
gpu-wheels: setup
	$(PY) -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0 rapidfuzz==$$($(PY) -c "import rapidfuzz; print(rapidfuzz.__version__)")

# The DaemonSet's CURVE keys (deploy/k8s/base/kustomization.yaml): the collector's pair and one pair the agents
# share; never committed (.gitignore). The base does not render without them: closed by default.
k8s-keys: setup
	$(VENV)/bin/grokwatch keygen --out deploy/k8s/base/curve --name collector
	$(VENV)/bin/grokwatch keygen --out deploy/k8s/base/curve --name agent

# The Prometheus Operator's copy of the rules (deploy/k8s/overlays/prometheus-operator), from the one rules file.
k8s-rules: setup
	$(PY) deploy/prometheus/to_prometheusrule.py > deploy/k8s/overlays/prometheus-operator/prometheusrule.yaml
	cp grafana/dashboards/grokwatch.json deploy/k8s/overlays/prometheus-operator/grokwatch-dashboard.json
	$(PY) deploy/k8s/examples/jobset/make_patch.py > deploy/k8s/examples/jobset/sidecar-patch.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
