"""Test-wide settings that must be in place before triton or deepspeed is imported."""

import os
import shutil

# Without an NVIDIA GPU, Triton kernels run in its interpreter and DeepSpeed uses its CPU
# accelerator (gloo). Both must be chosen before those packages are first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
