# The README's two commands: `make run` (set up + serve the web app) and `make test` (set up + whole test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: screenshots setup setup-dev browser pacs postgres run test bench

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

# Debian's Chromium for the end-to-end browser test (Playwright cannot download its own browser here), and
# axe-core from npm, which the test injects into each page to check accessibility (kept in the git-ignored .cache/).
AXE_VERSION := 4.14.1
AXE := .cache/axe/node_modules/axe-core/axe.min.js

browser: $(AXE)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium)

# Debian's Orthanc (a real PACS) and dcmtk (storescu as the X-ray machine) for the PACS tests; the tests start and
# stop their own Orthanc, so the packaged service is stopped and disabled.
pacs:
	@command -v Orthanc >/dev/null 2>&1 && command -v storescu >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc dcmtk && \
		{ service orthanc stop; update-rc.d orthanc disable; true; } >/dev/null 2>&1; }

# Debian's PostgreSQL server programs for the results-database tests: the tests run initdb and pg_ctl in a temporary
# folder of their own (as the postgres user when run as root), so the packaged cluster's service is stopped and disabled.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql && \
		{ service postgresql stop; update-rc.d postgresql disable; true; } >/dev/null 2>&1; }

$(AXE):
	@command -v npm >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q npm)
	npm install --prefix .cache/axe --no-save --no-package-lock --no-audit --no-fund axe-core@$(AXE_VERSION)
	touch $@

run: setup
	$(PY) main.py $(ARGS)

# The suite runs with pytest-xdist, one worker more than there are cores (one file per worker at a time, so module
# fixtures such as a live server start once): the extra worker runs while others wait on a server, Orthanc or Chromium
# (2 cores: 3 workers 222 s, 2 workers 238-248 s, 4 workers 257 s). PYTEST_ARGS adds options, e.g.
# PYTEST_ARGS="-n 0 -k train" to run a few tests serially.
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: setup-dev browser pacs postgres
	$(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The README's pictures, made by Chromium driving the real app on the demo model that `make run` serves (built first
# when missing), so they show the current code.
screenshots: setup-dev browser
	@command -v pdftoppm >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q poppler-utils)
	$(PY) Model_Training/demo.py --no-progress
	$(PY) tests/e2e/screenshot.py --checkpoint .cache/demo_model.pth

bench: setup-dev
	PY=$(PY) bash benchmarks/run_all.sh
