# Every target creates (or reuses) the virtual environment it needs: a fresh clone with only
# Python 3.10+ is enough. Installs are pinned by constraints.txt, a set of versions tested
# together (issue 15: a fresh unpinned install segfaulted the tests). To try the newest releases:
#   make test CONSTRAINTS= VENV=.venv-latest
# and when that passes, record them: .venv-latest/bin/pip freeze --exclude-editable > constraints.txt
# torch: PyPI's Linux build is the CUDA one (several GB, and its triton cannot load after
# TensorFlow in one process). The CPU build is taken from WHEELS when that folder exists (these
# machines keep it in /opt/wheels); elsewhere pass e.g. WHEELS=https://download.pytorch.org/whl/cpu/torch/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dlpipe-installed
DEMO := demo-out
CONSTRAINTS ?= constraints.txt
WHEELS ?= /opt/wheels
PIP_INSTALL := $(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) \
	$(if $(or $(wildcard $(WHEELS)),$(findstring ://,$(WHEELS))),--find-links $(WHEELS))
EXTRAS := tf,torch,hf,hdf5,webdataset,s3,ray,bench,test,transformers,lightning

.PHONY: venv demo test lint bench bench-reshard clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The main job end to end on a DeepCAL-like corpus it builds from real place names.
demo: venv
	$(PY) bench/corpus.py $(DEMO)/source --records 50000
	$(VENV)/bin/dlpipe inspect $(DEMO)/source/input_ids.npy $(DEMO)/source/labels.npy --pad-id 0
	$(VENV)/bin/dlpipe reshard input_ids=$(DEMO)/source/input_ids.npy labels=$(DEMO)/source/labels.npy \
		-o $(DEMO)/shards --pad-id 0 --num-shards 8 --shuffle --seed 0 --split train=0.9,validation=0.1 --overwrite
	$(VENV)/bin/dlpipe inspect $(DEMO)/shards
	$(VENV)/bin/dlpipe verify $(DEMO)/shards

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check dlpipe tests bench converters examples

bench-reshard: venv
	$(PY) bench/reshard_bench.py

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis

# Shuffle quality (rank correlation, displacement, exactly-once) beside samples/s for dlpipe's
# loaders and their peers (litdata, grain), issue 16. litdata requires torchvision but imports it
# only for images and video; PyPI's torchvision is a CUDA build that cannot load beside the CPU
# torch, so a torchvision that does not import is removed again.
.PHONY: bench-shuffle
bench-shuffle: venv
	$(PY) -c 'import litdata, grain' 2>/dev/null || { $(PIP_INSTALL) -e '.[peers]' && \
		{ $(PY) -c 'import torchvision' 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision; }; }
	$(PY) bench/shuffle_bench.py

# The prepared GPU check (issue 11): every GPU path of the PyTorch side, bounded, results in gpu-check/.
.PHONY: gpu-check
gpu-check: venv
	$(PY) bench/gpu_check.py --out gpu-check

# What a lent GPU machine (no network; PyTorch and numpy only) needs to run bench/gpu_run.sh:
# dlpipe's core dependencies as wheels for CPython 3.10-3.13 (about 1.5 MB), carried as .gpu-wheels.
.PHONY: gpu-wheels
gpu-wheels: venv
	for v in 3.10 3.11 3.12 3.13; do \
		$(PY) -m pip download -q -d .gpu-wheels --no-deps --only-binary=:all: --implementation cp \
			--python-version $$v --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
			--platform manylinux_2_28_x86_64 google-crc32c click isal || exit 1; \
	done
