# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmshield run mmshield/configs/demo.yaml

# pytest exits 5 when it collected no test: that must fail, not pass silently.
test: $(STAMP)
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check mmshield tests benchmarks scripts
	$(VENV)/bin/ruff format --check mmshield tests benchmarks scripts
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m benchmarks.simulator

clean:
	rm -rf $(VENV) runs
