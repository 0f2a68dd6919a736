# Two commands a newcomer needs: `make demo` and `make test`. Both create (or reuse) .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tapekit-installed
DEMO_DIR ?= demo_runs
PYTEST_ARGS ?=

# The lowest TensorFlow/Keras pair tapekit claims (BUILD.md, "Supported versions"), tested
# in a virtualenv of its own by `make test-oldest` (CI runs it after `make test`), on the
# version-sensitive tests only.
OLDEST_VENV ?= .venv-oldest
OLDEST_PINS ?= tensorflow==2.16.2 keras==3.10.0
OLDEST_STAMP := $(OLDEST_VENV)/.tapekit-installed

.PHONY: demo test test-oldest bench bench-quick install wheel clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,profile,mlflow]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/tapekit-train --trainer=regression --model=linear --model_dir=$(DEMO_DIR)/linear --progress=log
	$(VENV)/bin/tapekit-train --trainer=regression --model=mlp --model_dir=$(DEMO_DIR)/mlp --progress=log
	$(VENV)/bin/tapekit-train --trainer=gan --model=dense --real_mean=4 --real_stddev=1.25 \
	    --train_steps=2000 --sample_every_steps=500 --eval_every_steps=500 --model_dir=$(DEMO_DIR)/gan \
	    --export_dir=$(DEMO_DIR)/gan_generator --progress=log
	$(VENV)/bin/tapekit-train --trainer=gan --model=dcgan --train_steps=600 --steps_per_loop=50 \
	    --sample_every_steps=200 --model_dir=$(DEMO_DIR)/dcgan \
	    --export_dir=$(DEMO_DIR)/dcgan_generator --progress=log
	@echo
	@echo "Written under $(DEMO_DIR)/:"
	@echo "  */metrics.jsonl, */checkpoints/    every run"
	@echo "  */summaries/                       TensorBoard: pip install tensorboard; tensorboard --logdir $(DEMO_DIR)"
	@echo "  dcgan/samples/step_*.png           generated image grids"
	@echo "  gan_generator/, dcgan_generator/   SavedModels (serving_default)"

# -rfEs: a line for each failure, error and skip (with why); --durations: the slowest tests.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rfEs --durations=15 $(PYTEST_ARGS)

# Not the profile and mlflow extras: they need a newer numpy and protobuf than TensorFlow
# 2.16 takes (their tests run on the newest pair only).
$(OLDEST_STAMP): setup.cfg pyproject.toml Makefile
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet $(OLDEST_PINS) -e '.[test]'
	touch $(OLDEST_STAMP)

# Only what can differ between versions (tests/conftest.py, VERSION_SENSITIVE); the rest ran
# on the newest pair in `make test`.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q -rfEs --durations=15 -m version_sensitive $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench.py --readme benchmarks/README.md

bench-quick: $(STAMP)
	$(PY) benchmarks/bench.py --quick --json benchmarks/results-quick.json

wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build dist *.egg-info $(DEMO_DIR)
