# llava-cluster developer entry points. `make demo` and `make test` set everything up on a fresh clone.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= .demo

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel on this machine's disk; pyproject keeps a range for GPU images.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/llava-cluster demo --workdir $(DEMO)

test: setup
	$(BIN)/python -m pytest -q

lint: setup lint-docker
	$(BIN)/ruff check llava_cluster tests benchmarks

# CPU benchmarks, each printing its figures next to a baseline. benchmarks/merge_memory.py (writes a
# 14 GB checkpoint) and benchmarks/train_throughput.py (GPU) are run by hand: see benchmarks/RESULTS.md.
bench: setup
	$(BIN)/python benchmarks/sampler_padding.py
	$(BIN)/python benchmarks/packing_efficiency.py
	$(BIN)/python benchmarks/data_check.py

clean:
	rm -rf $(DEMO) .pytest_cache

# --- container images (docker/); REGISTRY, IMAGE and TAG can be overridden: make push REGISTRY=ghcr.io/me
REGISTRY  ?= ghcr.io/llava-cluster
IMAGE     ?= $(REGISTRY)/llava-cluster
VERSION   := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_SHA   := $(shell git rev-parse --short HEAD 2>/dev/null || echo nogit)
TAG       ?= $(VERSION)-$(GIT_SHA)
DOCKER    ?= docker

.PHONY: image image-cpu push sqsh sif lint-docker

image:
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE):$(TAG) .

image-cpu:
	$(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE):$(TAG)-cpu .

push: image
	$(DOCKER) push $(IMAGE):$(TAG)

# SLURM users: pyxis/enroot squashfs, or an Apptainer SIF, from the image in the local daemon.
sqsh: image
	enroot import -o llava-cluster-$(TAG).sqsh dockerd://$(IMAGE):$(TAG)

sif: image
	apptainer build llava-cluster-$(TAG).sif docker-daemon://$(IMAGE):$(TAG)

lint-docker: setup
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cpu
