# Every target creates (or reuses) the virtual environment it needs: a fresh clone with only
# Python 3.10+ is enough. torch is pinned: on these machines 2.13.0 is a local CPU build, while
# an unpinned torch downloads several GB of CUDA libraries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dlpipe-installed
DEMO := demo-out

.PHONY: venv demo test lint bench bench-reshard clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[tf,torch,hf,hdf5,webdataset,s3,ray,bench,test]'
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
