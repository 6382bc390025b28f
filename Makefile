# pcd_kernels developer commands. CI runs `make test` (through .ci/run) on a fresh clone.
#
#   make venv       .venv with torch, the package (editable, CUDA extension built when nvcc is
#                   found) and the test dependencies; idempotent
#   make test       the whole test suite (Triton kernels in the CPU interpreter when no GPU)
#   make demo       the trainer's embedded demo on CPU: teacher, PCD student, pooled baseline,
#                   dense evaluation table (runs/demo; a second run reprints the table)
#   make demo-study the demo over 5 seeds with PCD's ablations (about an hour on 2 cores): writes
#                   docs/demo_study.json, docs/demo_study.png and the table in docs/demo.md
#   make bench      python bench/run.py: every provider side by side (table, JSON, CSV, sweep plots in
#                   bench/runs/, which git ignores); it changes no tracked file
#   make bench-publish  the same into bench/results/ (committed), then bench/readme.py regenerates
#                   the measured results in docs/performance.md
#   make gpu-smoke  on a CUDA machine, at most about 7 minutes: builds for sm_90a, checks every op x
#                   backend x dtype against float64, trains 2 steps, measures every headline target;
#                   one table, files into RESULTS (bench/results). DRY_RUN=1: the same on a CPU
#                   (interpreter, tiny sizes, CUDA parts skipped) into bench/runs; CI runs that
#   make gpu-check  on a CUDA machine: build, test everything on the GPU, benchmark, plots, all under
#                   bench/results named by device and date, and docs/performance.md regenerated
#                   (= make gpu-test, then make gpu-bench)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch for the venv. This project's CPU machines hold a local CPU wheel of 2.13.0, so nothing
# large is downloaded there; elsewhere pick a spec and, for a CPU-only build, an index, e.g.
#   make venv TORCH_SPEC="torch>=2.4" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BUILD_DEPS := "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.24" ninja "nvidia-cutlass>=4.0"
# The frameworks tests/test_integrations.py builds losses through (their own registries), with the
# few packages those registries import. --no-deps: torchdistill declares torchvision (which pulls
# a multi-GB CUDA torch) and mmengine/mmcv-lite declare the GUI OpenCV; mmcv imports cv2, which the
# headless OpenCV wheel provides.
INTEGRATION_TEST_DEPS := torchdistill==1.1.5 pyyaml mmengine==0.10.7 addict yapf platformdirs termcolor \
  rich markdown-it-py mdurl pygments "tomli; python_version < '3.11'" \
  mmrazor==1.0.0 mmcv-lite==2.1.0 ordered-set==4.1.0 opencv-python-headless==5.0.0.93
# The GPU machine has torch, triton, pybind11, cmake and ninja installed and no package registry.
GPU_PYTHON ?= python3
RESULTS := bench/results

SHELL := /bin/bash
.PHONY: venv test demo demo-study bench bench-publish gpu-smoke gpu-install gpu-test gpu-bench gpu-check clean

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cu csrc/include/*/*.h csrc/include/*/*.cuh python/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install -q $(BUILD_DEPS)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps $(INTEGRATION_TEST_DEPS)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# DEMO_ARGS adds trainer flags (python -m pcd_kernels.train --help); change DEMO_DIR with them.
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
demo: venv
	$(PY) -m pcd_kernels.train --device cpu --output-dir $(DEMO_DIR) --resume $(DEMO_ARGS)

# STUDY_ARGS changes the study (python -m pcd_kernels.train.study --help); finished runs in
# runs/demo-study are reused, so an interrupted study continues.
STUDY_ARGS ?=
demo-study: venv
	$(PY) -m pcd_kernels.train.study --output-dir runs/demo-study --publish $(STUDY_ARGS)

# BENCH_ARGS narrows or changes a run (python bench/run.py --help), e.g. BENCH_ARGS=--quick.
BENCH_ARGS ?=
bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

bench-publish: venv
	$(PY) bench/run.py --publish $(BENCH_ARGS)

# On a CUDA machine (no package registry needed). gpu-test fits a 10-minute command limit; for
# gpu-bench, where one command may not run longer, split it by op: BENCH_ARGS="--ops
# pixel_contrastive omni_contrastive", then BENCH_ARGS="--ops pixel_attention". gpu-bench publishes
# (bench/run.py --publish: bench/results and docs/performance.md); RESULTS=<dir> puts the logs and
# JSON elsewhere and publishes nothing. BENCH_ARGS narrows the benchmark further (e.g.
# BENCH_ARGS="--cases pcd-target --providers naive ours-triton flex-attention").
# PYTEST_ARGS adds pytest options (e.g. "-n 8" where pytest-xdist is installed, or "-k cuda").
PYTEST_ARGS ?=
STAMP = $(shell $(GPU_PYTHON) -c "import torch, datetime; n = torch.cuda.get_device_name(); \
  print(''.join(c if c.isalnum() else '-' for c in n).strip('-').lower() + '_' + \
  datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S'))")

# The first command of a GPU lease: everything that matters in one run (bench/gpu_smoke.py).
ifeq ($(DRY_RUN),1)
gpu-smoke: venv
	$(PY) bench/gpu_smoke.py --dry-run $(if $(filter-out bench/results,$(RESULTS)),--out $(RESULTS))
else
gpu-smoke:
	@$(GPU_PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'needs a CUDA device (DRY_RUN=1 on a CPU)')"
	mkdir -p $(RESULTS)
	$(GPU_PYTHON) bench/gpu_smoke.py --out $(RESULTS)
endif

# The build reads CUTLASS's headers from the nvidia-cutlass wheel (CMakeLists.txt looks for
# cutlass_library). With no package index on the GPU machine, the wheel travels in .whl/
# (bench/gpu_smoke.py does the same before its build).
gpu-install:
	@$(GPU_PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'needs a CUDA device')"
	@if ! $(GPU_PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then \
	  wheel=$$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | sort -V | tail -n 1); \
	  if [ -z "$$wheel" ]; then \
	    echo "gpu-install: the extension build needs CUTLASS: cutlass_library is not installed and there is no" \
	      ".whl/nvidia_cutlass-*.whl; bring the wheel: \`pip download --no-deps nvidia-cutlass -d .whl\` on a" \
	      "machine with a package index, into this checkout's .whl/" >&2; \
	    exit 1; \
	  fi; \
	  echo "gpu-install: installing $$wheel (cutlass_library was missing)"; \
	  $(GPU_PYTHON) -m pip install -q --disable-pip-version-check --no-index --no-deps "$$wheel"; \
	fi
	$(GPU_PYTHON) -m pip install -q --disable-pip-version-check -e . --no-build-isolation --no-deps
	mkdir -p $(RESULTS)

gpu-test: gpu-install
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m pytest -q -rs --maxfail=20 $(PYTEST_ARGS) 2>&1 | tee $(RESULTS)/gpu-check-tests_$(STAMP).log; \
	  exit $${PIPESTATUS[0]}

# A run cut short still leaves its numbers in its JSON: publish them too.
BENCH_OUT = $(if $(filter bench/results,$(RESULTS)),--publish,--out $(RESULTS))
gpu-bench: gpu-install
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/run.py --device cuda $(BENCH_OUT) $(BENCH_ARGS) 2>&1 \
	  | tee $(RESULTS)/gpu-check-bench_$(STAMP).log; status=$${PIPESTATUS[0]}; \
	  if [ $$status -ne 0 ] && [ "$(RESULTS)" = bench/results ]; then $(GPU_PYTHON) bench/readme.py; fi; \
	  exit $$status

gpu-check:
	$(MAKE) gpu-test; tests=$$?; $(MAKE) gpu-bench; bench=$$?; \
	  echo "gpu-check: tests exit $$tests, bench exit $$bench"; test $$tests -eq 0 -a $$bench -eq 0

clean:
	rm -rf build $(VENV) pcd_kernels/_C*.so *.egg-info
