# make train   set up what is missing, then train configs/tiny.yaml under horovodrun -np 2 on the CPU
# make test    set up what is missing, then lint and run the whole test suite, two test files
#              at a time (TEST_WORKERS=2: pytest-xdist)
# make bench-data  prepare and loader throughput against training configs/small.yaml
# make bench-recipe  configs/small.yaml in fp32/bf16, remat, XLA: tokens/s, MFU, memory
# make bench-serving  generation latency with/without the KV cache; import-hf of a 1 GB checkpoint
# make bench-peers  configs/small.yaml through hvd_llama, keras-hub fit, MultiWorkerMirroredStrategy
#              and PyTorch eager/DDP, 1 and $(NP) processes; allreduce bandwidth (Gloo and MPI)
# make bench-strategies  dist.strategy horovod/mirrored/hybrid on configs/tiny.yaml and small.yaml
#              (logical CPU devices on a host without GPUs)
# make bench-zero  dist.zero 0-3 at 2 processes: tiny and small speed; memory of a 142M model
#              and of a thin 24-layer one (stage 3 with and without prefetch)
# make bench-timeline  stage 3's all-gathers in a Horovod timeline, prefetch on and off
# make bench-faults  a rank killed, preempted or frozen in 2-process runs (Gloo and MPI): time to
#              detect, exit status, work lost
# make setup   Debian packages, .venv/ with the pinned stack, Horovod built by docker/horovod/build.sh
#              (redone when the pins or the build change; a cached Horovod wheel makes it quick);
#              EXTRAS= the setup.cfg extras (the images: none, or gpu)
# make image-test  build docker/Dockerfile.cpu with podman and train tiny inside it (CI runs it)
# make two-nodes  the two-node checks alone (make test runs them where sshd is installed): launches
#              over ssh between two network namespaces on this machine (tests/two_nodes.py;
#              needs root; installs Debian's openssh-server)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
NP ?= 2
TEST_WORKERS ?= 2
EXTRAS ?= test
RUN_DIR ?= runs/tiny-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup train test test-bench lint bench-data bench-recipe bench-serving bench-peers \
	bench-strategies bench-zero bench-timeline bench-faults image-test two-nodes clean

setup: $(STAMP)

# Redone whenever the pins, the Horovod build script or its patches change.
$(STAMP): setup.cfg pyproject.toml docker/debian-packages.sh docker/horovod/build.sh \
		$(wildcard docker/horovod/*.patch)
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
		|| { echo "make setup: hvd_llama needs Python 3.11 (set PYTHON=...)"; exit 1; }
	bash docker/debian-packages.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	bash docker/horovod/build.sh $(PY)
	touch $@

train: setup
	$(VENV)/bin/horovodrun -np $(NP) -H localhost:$(NP) \
		$(PY) -m hvd_llama.train --config configs/tiny.yaml run.dir=$(RUN_DIR)

lint: setup
	$(PY) -m flake8 hvd_llama tests bench

test: lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--durations=25 -m "not bench"

# The benchmark scripts end to end, each on the smallest config (about 3 minutes).
test-bench: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -n $(TEST_WORKERS) --dist load -m bench

bench-data: setup
	$(PY) bench/data_throughput.py

bench-recipe: setup
	$(PY) bench/recipe.py

bench-serving: setup
	$(PY) bench/serving.py

bench-peers: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/peers.py --processes $(NP)

bench-faults: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/faults.py

bench-strategies: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/strategies.py

bench-zero: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/zero.py

bench-timeline: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/timeline.py

image-test:
	bash docker/image-test.sh

two-nodes: setup
	bash docker/debian-packages.sh openssh-server
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -v --durations=0 tests/test_two_nodes.py

clean:
	rm -rf $(VENV) *.egg-info
