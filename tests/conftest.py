import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))
# The toy model's UNet pre-training (adpo_train/toy.py) makes `make demo` learn visibly; the
# tests check the plumbing, so they build the toy with a short pre-training.
os.environ.setdefault("ADPO_TOY_PRETRAIN_STEPS", "20")
