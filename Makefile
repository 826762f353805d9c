# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := examples/digits/out
DIST   := dist

.PHONY: demo demo-build test lint typecheck pytest fast-test venv system-deps system-mosquitto bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 needed"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { $(MAKE) --no-print-directory system-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[host,agent,fleet,dev]'
	@touch $(STAMP)

# Debian/Ubuntu packages: python3-venv when venv is missing, mosquitto for the MQTT tests, chromium for the
# dashboard's browser test (Playwright drives /usr/bin/chromium; its own browser download is not used), faketime
# (libfaketime) for the clock-skew tests (tests/support/skewed_clock.py skews the agent's clock with it).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-venv:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv

system-deps: system-mosquitto
	@[ -x /usr/bin/chromium ] || \
	  { echo "installing chromium (apt)"; $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || \
	  { echo "installing faketime (apt)"; $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; }

system-mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { echo "installing mosquitto (apt)"; $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: $(STAMP) system-deps lint typecheck pytest

fast-test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

$(DEMO)/digits.keras: $(STAMP) examples/digits/train.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python examples/digits/train.py --out $(DEMO)

# The fleet demo: mosquitto, digits v1 and a fine-tuned v2 built for rpi4, the fleet service with its dashboard,
# 20 real agents in two groups, v1 rolled out, then v2 as a delta with a canary. Ctrl-C stops everything.
# DEMO_ARGS=--exit-when-done stops once v2 is on every device.
demo: $(DEMO)/digits.keras system-mosquitto
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/edgeops demo --workdir $(DIST)/demo $(DEMO_ARGS)

# Every profile built once from the digits example, with its HTML/JSON report.
demo-build: $(DEMO)/digits.keras
	@[ -f $(DIST)/keys/signing.key ] || $(BIN)/edgeops keys init --dir $(DIST)/keys
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/edgeops build $(DEMO)/digits.keras \
	  --profile rpi4 --profile x86-gateway --profile coral-edgetpu --profile ios --profile android-arm64 \
	  --calib $(DEMO)/calib.npz --eval $(DEMO)/eval.npz --key $(DIST)/keys/signing.key \
	  --version 1.0.0 --out $(DIST)/digits
	@for f in $(DIST)/digits/*.edgeops; do $(BIN)/edgeops verify $$f --pubkey $(DIST)/keys/signing.pub; done
	@echo "report: $(DIST)/digits/report.html (and report.json)"

bench: $(DEMO)/digits.keras system-mosquitto bench-deps
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/compile_bench.py
	$(BIN)/python benchmarks/agent_bench.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/delta_bench.py
	$(BIN)/python benchmarks/ota_bench.py

# The peer tools the delta benchmark compares against (Debian packages).
bench-deps:
	@{ command -v zstd && command -v xdelta3; } >/dev/null 2>&1 || \
	  { echo "installing zstd and xdelta3 (apt)"; $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd xdelta3; }

clean:
	rm -rf $(DIST) $(DEMO) .pytest_cache .mypy_cache .ruff_cache

.PHONY: bench-agent bench-delta bench-ota bench-deps
bench-agent: $(DEMO)/digits.keras system-mosquitto
	$(BIN)/python benchmarks/agent_bench.py

bench-delta: $(DEMO)/digits.keras bench-deps
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/delta_bench.py

bench-ota: $(DEMO)/digits.keras system-mosquitto
	$(BIN)/python benchmarks/ota_bench.py
