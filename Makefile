# Two commands for a new user:  `make demo` (set up, then train the built-in toy)
# and `make test` (set up, then run the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.inductor_cache

.PHONY: setup build demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt

setup: $(BIN)/python build

build: $(BIN)/python
	$(BIN)/pip install -q -e . --no-build-isolation --no-deps

# The demo trains the toy, then scores the LoRA against the toy base model with the toy reward
# (adpo_train.rewards.toy_reward: what the toy's preference set prefers) on the toy's 18 captions,
# 8 images each.  Guidance 3, not SD's 7.5: on the tiny toy 7.5 over-saturates base and tuned images
# alike, and the toy reward then mostly measures the saturation (docs/trainer.md, "The toy").  The
# same settings are bench/experiment.py's defaults.
TOY_RUN := outputs/adpo-toy
TOY_EVAL := --reward toy --num_images_per_prompt 8 --num_inference_steps 10 --guidance_scale 3
demo: setup
	$(BIN)/adpo-train
	$(BIN)/adpo-train evaluate --pretrained_model_name_or_path $(TOY_RUN)/toy/model-epsilon --lora $(TOY_RUN) \
		--prompts $(TOY_RUN)/toy/data/pick_a_pic_toy_256.parquet $(TOY_EVAL) \
		--output_dir outputs/adpo-toy-eval --overwrite_output_dir

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m bench loss

clean:
	rm -rf build *.egg-info adpo_kernels/*.so adpo_kernels/_build_info.json .pytest_cache
