# The two set-up commands (README): `make demo` and `make test`.
# Both bootstrap what they need: Debian packages, a .venv, and `pip install -e .[test]`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PKGS := iproute2 curl iputils-ping nftables tcpdump ethtool

.PHONY: demo test test-fast lint bench bootstrap debs clean

bootstrap: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory debs
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

# Install the Debian tools the interop tests and the demo drive, when missing and when we can.
debs:
	@missing=""; \
	for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing Debian packages:$$missing (install them as root for the interop tests)"; fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/shardstack demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VPY) -m mypy core netio
	PY=$(VPY) scripts/run-tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/shardstack bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache
