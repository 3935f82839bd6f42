# Two entry points for a fresh machine: `make demo` (main job, offline default) and `make test`.
# Each installs what it needs: a venv with the CPU torch wheel first (so no dependency pulls a
# CUDA build), the project, and the Debian data packages.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := dataset-fashion-mnist tuxpaint-stamps-default wordnet-base chromium chromium-driver

.PHONY: setup data demo test bench-extract clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

data:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup data
	$(VENV)/bin/vlclassify bench fewshot --data fashion-mnist \
	  --methods 'zero-shot,linear-probe,tip-adapter,cmm[schedule="fast";iters=4000]' \
	  --shots 1,4,16 --seeds 1,2,3 --test-limit 1000 --out runs/demo --name fewshot-fashion-mnist-demo

test: setup data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
