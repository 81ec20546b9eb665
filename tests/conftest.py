"""Fixtures shared by the tests; plain helpers live in ``helpers.py``."""

import gc
import logging
import os
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session", autouse=True)
def _imports_out_of_the_collectors_reach():
    """accelerate runs a full ``gc.collect()`` at every ``Trainer.train()`` (``free_memory``), which walks the
    hundreds of thousands of objects torch, transformers and the other imports made: about 0.3 s each time, most of
    the time of many trainer tests. Those objects live for the whole session anyway; frozen once (``gc.freeze``),
    they are left out of every collection, which then walks only what the tests made."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


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


@pytest.fixture(scope="session")
def short_run_data():
    """The embedded short run's training and test images, transformed once for every architecture's run."""
    from hf_bpmod.testing import short_run_data

    return short_run_data()


@pytest.fixture(scope="session")
def script() -> ModuleType:
    """``examples/run_image_classification.py`` as a module, with its sibling modules imported as it imports them."""
    from helpers import import_script

    return import_script()


@pytest.fixture
def logging_restored():
    """The example's ``main()`` sets the transformers and datasets verbosity and the root logger's handlers: undo
    it after the test."""
    import datasets
    import transformers

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    verbosity, data_verbosity = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    yield
    root.handlers[:], root.level = handlers, level
    transformers.utils.logging.set_verbosity(verbosity)
    datasets.utils.logging.set_verbosity(data_verbosity)


@pytest.fixture
def unreachable_hub(monkeypatch) -> list[str]:
    """The Hub online in name (HF_HUB_OFFLINE unset) but refusing connections; returns the probes' results."""
    from helpers import closed_port_endpoint
    from huggingface_hub import constants

    from hf_bpmod import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed_port_endpoint())
    probes: list[str] = []
    original = hub.hub_unreachable_reason

    def probe():
        probes.append(original())
        return probes[-1]

    monkeypatch.setattr(hub, "hub_unreachable_reason", probe)  # where hub_access looks it up
    return probes
