PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Keeps a CPU-only machine on torch's CPU wheel; `make test CONSTRAINTS=` keeps the torch already installed.
CONSTRAINTS ?= constraints-cpu.txt
PIP_INSTALL = $(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install test bench bench-data bench-step bench-pref bench-validate lint quickstart validate assets docs

install:
	$(PIP_INSTALL) -e '.[dev]'

# Two or more test processes (pytest-xdist, one per core): the suite's time is mostly process starts (each imports
# torch, transformers and peft: ~8 s of CPU) and torchrun runs, which one process runs one after another.
test: install
	$(PYTHON) -m pytest -q -n auto --dist worksteal

bench: install
	$(PYTHON) bench/clip_bench.py

# ftclip against HF Trainer + peft (needs the bench extra: accelerate). Pass options with STEP_BENCH_ARGS,
# e.g. make bench-step STEP_BENCH_ARGS="--steps 5 --device cuda".
bench-step: install
	$(PIP_INSTALL) -e '.[bench]'
	$(PYTHON) bench/step_bench.py $(STEP_BENCH_ARGS)

# ftclip's DPO against TRL's DPOTrainer + peft, and against ftclip's SFT (needs the bench extra: accelerate, trl).
# Pass options with PREF_BENCH_ARGS, e.g. make bench-pref PREF_BENCH_ARGS="--steps 10 --device cuda".
bench-pref: install
	$(PIP_INSTALL) -e '.[bench]'
	$(PYTHON) bench/pref_bench.py $(PREF_BENCH_ARGS)

# Data stage vs plain `datasets` (200k generated records; --records N to change): see bench/RESULTS.md.
bench-data: install
	$(PYTHON) bench/data_bench.py

# `ftclip validate recipes/*.yaml` against `python3 -c "import yaml, pydantic"`, side by side (issue 17's target: +0.5 s).
bench-validate: install
	$(PYTHON) bench/validate_bench.py --torch-reference

lint: install
	$(PYTHON) -m ruff check ftclip tests bench

quickstart: install
	ftclip train recipes/quickstart.yaml

validate: install
	ftclip validate recipes/*.yaml

# Rebuild the quickstart's tiny model, tokenizer and data (deterministic; committed to the repo).
assets: install
	$(PYTHON) recipes/quickstart/build.py

# Regenerate the generated parts of docs/ (recipes.md's key reference, axolotl.md's key table) from the code.
docs: install
	$(PYTHON) -m ftclip.reference

# The GPU run (issue 25, docs/gpu.md). gpu-wheels: the wheels the lent GPU machine lacks (bitsandbytes slimmed
# to its CUDA 13 libraries, datasets and its missing needs, pydantic, liger-kernel) into the ignored .whl/,
# which the device call carries. gpu-check: the same script end to end on the CPU with tiny shapes.
.PHONY: gpu-wheels gpu-check
gpu-wheels:
	$(PYTHON) bench/gpu/wheels.py download .whl

gpu-check: install
	PYTHON=$(PYTHON) bash bench/gpu/run.sh --cpu-smoke
