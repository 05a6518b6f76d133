# The README's two commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dv3-installed

.PHONY: install test test-fast demo lint clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $(STAMP)

## test: install everything the tests need, then run the whole suite (what CI runs)
test: install
	$(PY) -m pytest tests

## test-fast: the unit tests only (skips multi-process, SLURM and ablation end-to-end tests)
test-fast: install
	$(PY) -m pytest -m "not slow" tests

## demo: prepare the default corpus, pretrain `tiny` on 2 CPU ranks under ZeRO-3, export to HF
demo: install
	VENV=$(VENV) scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check engine kernels data_pipeline tests

clean:
	rm -rf $(VENV) build *.egg-info
