# funnelgate — every target installs what it needs; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/funnelgate serve $(ARGS)

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser tests drive Debian's chromium through Playwright (a test tool's own browser
# download fails offline). Without recommends: those pull in systemd, avahi and printing;
# fonts-liberation is the one recommend screenshots need (Arial's metrics). When apt cannot
# install it (no root, no network), the browser tests skip and say why; the build goes on.
BROWSER := /usr/bin/chromium
APT_BROWSER := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	chromium fonts-liberation >/dev/null 2>&1
browser:
	@test -x $(BROWSER) || { $(APT_BROWSER) || \
		{ apt-get update -qq >/dev/null 2>&1 && $(APT_BROWSER); } || \
		echo "chromium not installed: the browser tests will skip"; }

lint: $(STAMP)
	$(BIN)/ruff check server tools tests bench
	$(BIN)/ruff format --check server tools tests bench
	$(BIN)/mypy --strict server tools tests

# Load comes from wrk (Debian's package) when it can be installed, else from a Python generator
# that bench/e2e.py shows is not the bottleneck. BENCH_ARGS=--write BENCHMARKS.md records.
bench: $(STAMP)
	$(BIN)/pip install --quiet -r bench/requirements.txt
	@command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; } || \
		echo "wrk not installed: using the Python load generator"; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
