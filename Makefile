# Two commands a newcomer needs: `make demo` and `make test`. Both create (or reuse) .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tapekit-installed
DEMO_DIR ?= demo_runs
PYTEST_ARGS ?=

.PHONY: demo test install wheel clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/tapekit-train --trainer=regression --model=linear --model_dir=$(DEMO_DIR)/linear
	$(VENV)/bin/tapekit-train --trainer=regression --model=mlp --model_dir=$(DEMO_DIR)/mlp
	$(VENV)/bin/tapekit-train --trainer=gan --model=dense --model_dir=$(DEMO_DIR)/gan
	@echo "Runs written under $(DEMO_DIR)/ (metrics.jsonl in each)."

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO_DIR)
