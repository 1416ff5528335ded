# Two entry points for a fresh machine (Python, pip, gcc; Node.js/npm, Chromium and Xvfb come from Debian if missing):
#   make demo   set up .venv, the web task bundle and Chromium, and run the embedded demo
#   make test   the same set-up, then the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

WEB_BUNDLE := closedloop/behavior/_web/task.js

.PHONY: setup web browser xvfb demo validate test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test,rig]'
	# the peer of `closedloop bench --peers` (tests/closedloop/test_bench.py); --no-deps: its metadata
	# pins requests~=2.25.1, which only its unused download helpers need (pyproject.toml, extra `bench`)
	$(BIN)/python -m pip install --quiet --no-deps 'torchattacks==3.5.1'
	touch $(STAMP)

# The behavioural web task: jsPsych from npm (web/package-lock.json), bundled by esbuild into
# closedloop/behavior/_web/ (git-ignored), which `closedloop behavior build` copies into each build.
$(WEB_BUNDLE): web/package.json web/package-lock.json web/src/task.js web/src/task.css web/src/dashboard.js web/src/dashboard.css
	command -v npm >/dev/null || (apt-get update && apt-get install -y nodejs npm)
	cd web && npm ci --no-audit --no-fund && npm run build

web: $(WEB_BUNDLE)

# Debian's Chromium for the simulated observers and PDF reports (no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)

# Debian's Xvfb with Mesa's software OpenGL: the display rig's tests open PsychoPy windows on a
# virtual X server (tests/rigs/display/).
xvfb:
	dpkg -s xvfb xauth libgl1-mesa-dri libglu1-mesa >/dev/null 2>&1 || (apt-get update && apt-get install -y \
		xvfb xauth libgl1-mesa-dri libglu1-mesa)

setup: $(STAMP) web browser xvfb

# The demo and the campaign with torch's CPU kernels pinned to AVX2, as the suite runs
# (tests/conftest.py): their printed numbers are then the same on AVX2 and AVX-512 machines.
PORTABLE_KERNELS = ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2

demo: setup
	$(PORTABLE_KERNELS) $(BIN)/closedloop demo

validate: setup
	$(PORTABLE_KERNELS) $(BIN)/closedloop validate

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/closedloop bench --json

clean:
	rm -rf $(VENV) .pytest_cache web/node_modules closedloop/behavior/_web
