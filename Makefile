# ebpf-apm: the two commands a fresh machine needs are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@bash deploy/setup-host.sh

demo: setup
	@$(PY) demo/run_demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy ebpf_apm
	$(VENV)/bin/lint-imports --no-cache

test: setup lint
	$(VENV)/bin/pytest

bench: setup
	$(PY) benchmarks/agent_throughput.py
	$(PY) benchmarks/probe_overhead.py
	$(PY) benchmarks/probe_cost_accuracy.py
	$(PY) benchmarks/metrics_scrape_cost.py
	$(PY) benchmarks/server_probe_cost.py
	$(PY) benchmarks/client_probe_cost.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
