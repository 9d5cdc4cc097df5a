# The few commands a newcomer needs. `make run` and `make test` work from a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: an unpinned torch lets pip pull a multi-GB CUDA build.
# Elsewhere add e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
MODEL ?= smollm2-135m
# test downloads and the dequantised GGUF are cached here between runs (safe to delete)
export ORTLLM_TEST_CACHE ?= $(CURDIR)/.cache/test

.PHONY: install install-run browser node services run chat test test-genai014 optimum-env test-optimum lint format clean

# Two levels, a stamp each: `make run`/`make chat` install what running needs (the project and the convert
# extra), `make install`/`make test` add the test and dev tools on top (after `make run`, only those).
# pip shows its own progress (downloads, then one bar over the packages it installs) and each step
# prints a line with the seconds since make started.
START := $(shell date +%s)
step = @echo "==> [$$(( $$(date +%s) - $(START) )) s] $(1)"
# pip commands go through scripts/retry: a connection to PyPI dropped mid-download is tried again
RETRY := sh scripts/retry
PIP_INSTALL = $(RETRY) $(BIN)/python -m pip install --progress-bar on

$(BIN)/.installed-run: setup.cfg pyproject.toml
	$(call step,creating $(VENV))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(RETRY) $(BIN)/python -m pip install -q --upgrade pip
	$(call step,installing torch $(TORCH_VERSION) (CPU build; the largest download))
	$(PIP_INSTALL) torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(call step,installing ortllm with the convert extra)
	$(PIP_INSTALL) -e '.[convert]'
	$(call step,installed what running needs in $(VENV))
	touch $@

$(BIN)/.installed: $(BIN)/.installed-run
	$(call step,adding the test and dev tools to $(VENV))
	$(PIP_INSTALL) -e '.[convert,test,dev]'
	$(call step,installed the test and dev tools)
	touch $@

install-run: $(BIN)/.installed-run  ## create .venv with the project and the convert extra (what `make run` needs)

install: $(BIN)/.installed  ## create .venv with the project, the convert extra and the test and dev tools

run: install-run  ## convert the default model if needed, then serve it on 127.0.0.1:8000
	$(BIN)/ortllm show $(MODEL) >/dev/null 2>&1 || $(BIN)/ortllm pull $(MODEL)
	$(BIN)/ortllm serve --model $(MODEL) $(SERVE_ARGS)

chat: install-run  ## convert the default model if needed, then chat in the terminal
	$(BIN)/ortllm show $(MODEL) >/dev/null 2>&1 || $(BIN)/ortllm pull $(MODEL)
	$(BIN)/ortllm chat $(MODEL)

# the web UI tests drive the system's Chromium (Debian package); no browser is ever downloaded
browser:  ## install Debian's chromium when missing (as root with apt; elsewhere the UI tests skip)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "chromium not found: install it (e.g. apt-get install chromium) or the web UI tests are skipped"; fi

# the replicas tests start their own PostgreSQL, Redis and HAProxy on loopback (Debian packages, never downloaded)
services:  ## install Debian's postgresql, redis-server and haproxy when missing (as root with apt; elsewhere those tests skip)
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && command -v redis-server >/dev/null && \
	{ command -v haproxy >/dev/null || test -x /usr/sbin/haproxy; } || \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server haproxy; \
	else echo "postgresql/redis-server/haproxy not found: install them or the replicas tests are skipped"; fi

# the JavaScript client test runs the `openai` npm package under Debian's Node (no Node is ever downloaded)
node:  ## install Debian's nodejs and npm when missing (as root with apt; elsewhere the JS test skips, or fails with CI set)
	@command -v node >/dev/null && command -v npm >/dev/null || \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; \
	else echo "node/npm not found: install them (e.g. apt-get install nodejs npm) or the JS client test is skipped"; fi

test: install browser node services  ## run the test suite (converts the default model once per run), then the 0.14 and optimum runs
	$(BIN)/python -m pytest -q -ra --ignore=tests/test_embedding_model.py $(PYTEST_ARGS)
	$(MAKE) test-genai014
	$(MAKE) test-optimum

# onnxruntime-genai 0.14.1 is the API of the last DirectML release (onnxruntime-genai-directml):
# the runtime tests run there unchanged on the model the main run converted (Generator path).
VENV014 ?= .venv-genai014
$(VENV014)/.installed: setup.cfg pyproject.toml
	test -x $(VENV014)/bin/python || $(PYTHON) -m venv $(VENV014)
	$(RETRY) $(VENV014)/bin/python -m pip install -q --upgrade pip
	$(RETRY) $(VENV014)/bin/python -m pip install -q onnxruntime-genai==0.14.1 -e . pytest
	touch $@

test-genai014: $(VENV014)/.installed  ## runtime tests on onnxruntime-genai 0.14.1 (needs a main run's model)
	ORTLLM_TEST_PREBUILT=$(ORTLLM_TEST_CACHE)/prebuilt $(VENV014)/bin/python -m pytest -q -ra tests/test_runtime.py

# optimum[onnxruntime] pins transformers<4.58 while the genai builder (convert extra) needs >=5, so the
# optimum backend gets its own environment: `.venv-optimum/bin/ortllm convert --backend optimum SOURCE`.
# sentence-transformers is there for the tests' reference vectors (it resolves to a transformers-4 release).
VENVOPT ?= .venv-optimum
$(VENVOPT)/.installed: setup.cfg pyproject.toml
	test -x $(VENVOPT)/bin/python || $(PYTHON) -m venv $(VENVOPT)
	$(RETRY) $(VENVOPT)/bin/python -m pip install -q --upgrade pip
	$(RETRY) $(VENVOPT)/bin/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(RETRY) $(VENVOPT)/bin/python -m pip install -q -e '.[optimum]' pytest sentence-transformers
	touch $@

optimum-env: $(VENVOPT)/.installed  ## create .venv-optimum: the optimum backend (GPT-2, Falcon, embedding models)

# Order: the optimum run converts the main run's dequantised SmolLM2 and exports all-MiniLM-L6-v2
# (with sentence-transformers' vectors) to prebuilt/; the main environment's embedding tests then
# serve that export, so they run here, after it, and not in the main run.
test-optimum: install $(VENVOPT)/.installed  ## optimum backend tests in .venv-optimum, then the embedding model in the main env
	$(VENVOPT)/bin/python -m pytest -q -ra tests/test_optimum.py
	$(BIN)/python -m pytest -q -ra tests/test_embedding_model.py

# import-linter reads a package's own folder: the contracts (pyproject.toml) are checked on a copy laid
# out as installed, with web/, cli/ and converters/ inside ortllm/ (setup.cfg's package_dir)
LINT_TREE := .cache/lint
lint: install  ## ruff (lint + format) everywhere, mypy on the library, web, cli and converters, import contracts
	$(BIN)/ruff check ortllm converters cli web tests benchmarks
	$(BIN)/ruff format --check ortllm converters cli web tests benchmarks
	$(BIN)/mypy ortllm web cli converters
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE) && cp -r ortllm $(LINT_TREE)/ortllm && \
		cp -r web $(LINT_TREE)/ortllm/web && cp -r cli $(LINT_TREE)/ortllm/cli && cp -r converters $(LINT_TREE)/ortllm/converters
	cd $(LINT_TREE) && $(abspath $(BIN))/lint-imports --no-cache $(CURDIR)/pyproject.toml

format: install
	$(BIN)/ruff format ortllm converters cli web tests benchmarks
	$(BIN)/ruff check --fix ortllm converters cli web tests benchmarks

clean:
	rm -rf $(VENV) $(VENV014) $(VENVOPT) .cache build *.egg-info .pytest_cache tests/js/node_modules
