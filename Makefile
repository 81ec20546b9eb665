# hf_bpmod: every target installs what it needs into a local virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this machine serves; on a CUDA machine use e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
TRAIN_ARGS ?=

# pip without byte-compiling what it installs: Python compiles the modules a run imports, and installs take half the time.
PIP_INSTALL := -m pip install -q --no-compile

.PHONY: install train test test-fast test-compat test-lean test-slow mutation quality style bench study research-test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PY) $(PIP_INSTALL) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job: a small ResNet (8 blocks) from a config, trained on the embedded Animal-Shape-MNIST data with the
# package's default method for it (the BP-modified local loss, h = 1: ResNets get the offset by default) and the
# paper's optimizer (SGD, momentum 0.9), then evaluated and saved to runs/default. The example's small ViT with AdamW
# (which trains without the offset by default) is TRAIN_MODEL="--learning_rate 2e-3 --weight_decay 0.01"
# TRAIN_ARGS="--num_train_epochs 5".
TRAIN_MODEL ?= --model_type resnet --optim sgd --optim_args momentum=0.9 --learning_rate 0.05 --config_overrides \
	"embedding_size=16,hidden_sizes=[16,32,64,128],depths=[2,2,2,2],layer_type=basic,downsample_in_first_stage=false"
train: install
	$(PY) examples/run_image_classification.py --output_dir runs/default \
		--num_train_epochs 8 --per_device_train_batch_size 64 --per_device_eval_batch_size 250 \
		$(TRAIN_MODEL) \
		--eval_strategy epoch --save_strategy epoch --save_total_limit 1 --logging_steps 25 \
		--dataloader_drop_last --report_to none --seed 0 $(TRAIN_ARGS)

# The tests run in parallel (pytest-xdist: one process per core, at most TEST_WORKERS; one thread each), and the
# slowest are listed at the end. `make test` is the whole suite; `make test-fast`, for the edit loop, leaves out the
# tests marked slow (training runs on the embedded data, the example in a subprocess) and the torchrun ones.
TEST_WORKERS ?= 8
PYTEST = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(1)/bin/python -m pytest -q -W ignore::FutureWarning \
	-n auto --maxprocesses $(TEST_WORKERS) --dist worksteal --durations=20
test: install
	$(call PYTEST,$(VENV))

test-fast: install
	$(call PYTEST,$(VENV)) -m "not slow and not distributed and not gpu"

# The tests marked `compat` (the code that depends on the release: the adapters' layer lookup, compat.py, checkpoints
# and resume, the example's Hub and offline paths, PEFT wrapping) against the oldest releases we support (the floors
# of pyproject.toml, pinned in tests/constraints-oldest.txt), in a virtual environment of its own.
COMPAT_VENV ?= .venv-compat
$(COMPAT_VENV)/.installed: pyproject.toml Makefile tests/constraints-oldest.txt
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/python $(PIP_INSTALL) -c tests/constraints-oldest.txt -e ".[dev]"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(call PYTEST,$(COMPAT_VENV)) -m "compat and not slow and not gpu"

# `pip install .` into a virtual environment holding only torch: no examples' dependencies, and it trains.
LEAN_VENV ?= .venv-lean
test-lean:
	rm -rf $(LEAN_VENV) build && python3 -m venv $(LEAN_VENV)
	$(LEAN_VENV)/bin/python $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(LEAN_VENV)/bin/python $(PIP_INSTALL) .
	cd $(LEAN_VENV) && OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} bin/python $(CURDIR)/scripts/check_lean_install.py

# Only the tests marked slow.
test-slow: install
	$(call PYTEST,$(VENV)) -m "slow and not gpu"

# A mutation check of the algorithm modules (scripts/mutation_check.py): hand-written mutants for the mistakes the
# suite must catch, and a seeded sample of operator mutants, each against the fast tests of its module; every
# file is restored after its mutant. About 10-15 minutes on 2 cores; MUTATION_ARGS="--per-module 0" runs only the
# hand-written ones.
MUTATION_ARGS ?=
mutation: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/mutation_check.py $(MUTATION_ARGS)

quality: install
	$(PY) -m ruff check hf_bpmod examples tests benchmarks scripts research
	$(PY) -m ruff format --check hf_bpmod examples tests benchmarks scripts research

style: install
	$(PY) -m ruff check --fix hf_bpmod examples tests benchmarks scripts research
	$(PY) -m ruff format hf_bpmod examples tests benchmarks scripts research

bench: install
	$(PY) benchmarks/run_all.py

# The CPU-scale study (research/cpu_study.py): both small models, SGD with momentum, BP / FF / FF-modified / LoCo /
# LoCo-modified, 2 seeds, two runs at a time; about 15 minutes on 2 cores. Table and plots in $(STUDY_OUT); the
# committed study (both optimizers, the paper's rule too) is research/results/cpu_study, see research/README.md.
STUDY_OUT ?= runs/cpu_study
study: install
	OMP_NUM_THREADS=1 $(PY) research/cpu_study.py --jobs 2 --threads 1 --out $(STUDY_OUT) --optimizers sgd \
		--methods bp ff ff_mod loco loco_mod
	$(PY) research/cpu_study.py --out $(STUDY_OUT) --report --plots

# The study's committed records reproduce the figures research/offset_study.md quotes (not part of `make test`).
research-test: install
	$(PY) -m pytest -q research/tests -p no:cacheprovider

clean:
	rm -rf runs .pytest_cache .ruff_cache
