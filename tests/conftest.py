import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture(autouse=True)
def _own_environment():
    """Each test gets the environment it started with: transformers < 5 exports some `TrainingArguments` (bf16 as
    ACCELERATE_MIXED_PRECISION, fsdp, torch_compile) to accelerate through environment variables, and these would
    silently change every later Trainer of the test process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
