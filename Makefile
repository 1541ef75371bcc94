# resnet-serve: every workflow is one target. `make demo` and `make test` need nothing installed beforehand.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DATA ?= digits
NAME ?= $(if $(filter digits,$(DATA)),digits,$(notdir $(patsubst %/,%,$(DATA))))
ARCH ?= resnet18
INPUT_SIZE ?= 32
EPOCHS ?= 5
CHECKPOINTS ?= checkpoints/$(NAME)
MODELS ?= models/$(NAME)
PORT ?= 50051
METRICS_PORT ?= 8000
HEALTH_PORT ?= 50052
PROMETHEUS_PORT ?= 9090
OBSERVE_DIR ?= runs/prometheus
# Installed once; again only when a pyproject.toml changes (every target depends on install).
STAMP := $(VENV)/.installed
# The workspace's distributions, one per top-level folder (docs/architecture.md, "Layout").
PARTS := common protos client server export train

.PHONY: install proto train export serve demo test bench lint clean deploy-check gpu-check observe

$(PY):
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(STAMP)  ## create .venv and install the project with its dev tools (once; again when pyproject.toml changes)

$(STAMP): pyproject.toml $(PARTS:%=%/pyproject.toml) | $(PY)
	$(BIN)/pip install --quiet $(PARTS:%=-e ./%) -e '.[dev]'
	@touch $@

proto: install  ## regenerate the committed gRPC stubs from protos/resnet_serve/protos/classifier.proto
	$(PY) -m resnet_serve.protos.generate

train: install  ## train a ResNet on DATA (default: the embedded digits) into checkpoints/NAME
	$(BIN)/resnet-train --data $(DATA) --arch $(ARCH) --input-size $(INPUT_SIZE) --epochs $(EPOCHS) \
		--out $(CHECKPOINTS) $(TRAIN_ARGS)

export: install  ## export the latest checkpoint of `make train` as the next model version
	$(BIN)/resnet-export --checkpoint $(CHECKPOINTS) --out $(MODELS)

serve: install  ## serve the newest exported version
	$(BIN)/resnet-serve --model-dir $(MODELS) --port $(PORT) --metrics-port $(METRICS_PORT) --health-port $(HEALTH_PORT)

demo: install  ## train -> export -> serve -> classify held-out digits through the client -> accuracy + metrics
	@test -d $(CHECKPOINTS) || $(MAKE) --no-print-directory train
	@test -d $(MODELS) || $(MAKE) --no-print-directory export
	$(PY) -m resnet_serve.client.tools.demo --model-dir $(MODELS) --port $(PORT) --metrics-port $(METRICS_PORT)

observe:  ## Prometheus (Debian's package) with deploy/prometheus/prometheus.yml, scraping a local `make serve`
	@command -v prometheus >/dev/null || { echo "error: prometheus not found: apt-get install prometheus" >&2; exit 2; }
	@mkdir -p $(OBSERVE_DIR)
	@sed 's/localhost:8000/localhost:$(METRICS_PORT)/' deploy/prometheus/prometheus.yml > $(OBSERVE_DIR)/prometheus.yml
	@echo "Prometheus: http://localhost:$(PROMETHEUS_PORT) (job resnet-serve scraping localhost:$(METRICS_PORT): run \
	'make serve' in another shell; Grafana: README.md, Operate; Ctrl-C stops)"
	@exec prometheus --config.file=$(OBSERVE_DIR)/prometheus.yml --storage.tsdb.path=$(OBSERVE_DIR)/data \
		--web.listen-address=localhost:$(PROMETHEUS_PORT) --log.level=warn

test: install  ## the whole test suite (CI runs this)
	$(PY) -m pytest -q

bench: install  ## the benchmark protocol (docs/BENCHMARKS.md); writes bench/results/ and docs/BENCHMARKS.md
	$(PY) -m bench.run

# Not `install`: that would add the CPU `paddlepaddle` beside the GPU wheel. Run it with the Python that has
# paddlepaddle-gpu and this project's parts installed with --no-deps (docs/gpu.md), e.g. `make gpu-check GPU_PYTHON=python3`.
GPU_PYTHON ?= python3
gpu-check:  ## GPU acceptance run (docs/gpu.md): exports, every GPU engine x precision, agreement, speed, server; JSON + table
	$(GPU_PYTHON) -m bench.gpu_check

deploy-check: install  ## render deploy/k8s with `kubectl kustomize` (needs kubectl >= 1.27), validate it offline, lint deploy/docker
	$(PY) deploy/check.py

lint: install  ## ruff, then pyright: every import in the parts, bench/ and tests/ resolves ([tool.pyright])
	$(BIN)/ruff check .
	$(BIN)/pyright --pythonpath $(PY)

clean:
	rm -rf checkpoints models runs .pytest_cache
