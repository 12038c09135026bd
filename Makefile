# Set-up is part of each target: on a fresh machine `make demo` and `make test` do everything.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdqueue-installed

.PHONY: install demo test services browser clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a CUDA build of several GB
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[worker,test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/sdqueue demo

# Two pytest processes, a test file each at a time (pytest-xdist): most tests wait on servers and workers
test: install services browser
	$(PY) -m pytest -n 2 --dist loadfile

services:
	deploy/dev-services.sh

# Chromium for the dashboard's browser test, from apt where it is missing
browser:
	deploy/dev-browser.sh

clean:
	rm -rf $(VENV) sdqueue-demo .pytest_cache
