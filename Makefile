# Two commands on a fresh clone, each doing all set-up first and skipping what is already done:
#   make report   set-up, then the main job: the test-task report (outputs/test_task.html)
#   make test     set-up, then the tests (what CI runs)
#   make gpu      the GPU check, scripts/gpu_check.sh (its own set-up; GPU_CHECK_DRY=1: on the CPU)
# Set-up: a virtual environment with the pinned packages, and the offline data copies when
# ../shared/data is there (online, datasets download on first use instead).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED := ../shared/data
ARCHIVES := $(wildcard $(SHARED)/*.tar.gz)

.PHONY: report test setup data gpu
report: setup data
	$(PY) seqlstm.py report params/test_task.yaml

test: setup data
	$(PY) -m pytest

gpu:
	bash scripts/gpu_check.sh

setup: $(VENV)/.installed
data: data/.unpacked

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

data/.unpacked: $(ARCHIVES)
	mkdir -p data
	@for f in $(ARCHIVES); do echo "unpacking $$f"; tar -xzf "$$f" -C data; done
	@[ -n "$(ARCHIVES)" ] || echo "no $(SHARED): datasets download on first use"
	touch $@
