# Two entry points for a fresh machine: `make demo` (main job, offline default) and `make test`.
# Each installs what it needs: a venv with the CPU torch wheel first (so no dependency pulls a
# CUDA build), the project, and the Debian data packages. `make test` runs `make check` (lint,
# types, the wheel installed into a clean venv, the API docs) and then the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := dataset-fashion-mnist tuxpaint-stamps-default wordnet-base chromium chromium-driver mate-backgrounds
CHECK_DIRS := src tests benchmarks scripts
# 1: `make check` fails when a public function, class or method has no docstring
# (`.venv/bin/python scripts/docstrings.py --list` names them).
REQUIRE_DOCSTRINGS ?= 1

# $(call timed,NAME,COMMAND): run COMMAND, fail the make run if it fails, print its wall time.
timed = @echo "--- $(1)"; t0=$$(date +%s); $(2) || exit 1; echo "--- $(1) ok ($$(( $$(date +%s) - t0 )) s)"

.PHONY: setup check-tools data demo test check lint types wheel-check docs docstrings clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

# ruff, mypy, build, pdoc: the `check` extra, pinned in pyproject.toml
check-tools: $(VENV)/.check-tools

$(VENV)/.check-tools: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test,check]'
	touch $@

data:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup data
	$(VENV)/bin/vlclassify bench fewshot --data fashion-mnist \
	  --methods 'zero-shot,linear-probe,tip-adapter,cmm[schedule="fast";steps=4000]' \
	  --shots 1,4,16 --seeds 1,2,3 --test-limit 1000 --out runs/demo --name fewshot-fashion-mnist-demo

test: setup data check
	$(PY) -m pytest  # last, so its summary line closes the output

# In this order; the first failing step stops the run.
check: lint types wheel-check docs docstrings

lint: check-tools
	$(call timed,ruff,$(VENV)/bin/ruff check $(CHECK_DIRS) && $(VENV)/bin/ruff format --check $(CHECK_DIRS))

types: check-tools
	$(call timed,mypy,$(VENV)/bin/mypy)

wheel-check: check-tools data
	$(call timed,wheel install,PYTHON=$(PY) scripts/check_wheel.sh)

docs: check-tools
	$(call timed,api docs,$(PY) scripts/build_docs.py --out docs/api/_build)

docstrings: setup
	$(call timed,docstrings,$(PY) scripts/docstrings.py $(if $(filter 1,$(REQUIRE_DOCSTRINGS)),--require))

clean:
	rm -rf $(VENV) runs docs/api/_build
