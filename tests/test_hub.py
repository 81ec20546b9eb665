"""Loading with the Hub offline or unreachable (:mod:`hf_bpmod.hub`): the Hub is tried once, an unreachable one
means the local cache only (a cached model loads at once, a missing one fails at once), local paths never try it,
and a failed load says how to run offline."""

import pytest
import torch
import transformers
from helpers import put_in_hub_cache, save_pretrained_vit
from huggingface_hub import constants
from transformers import AutoConfig, AutoModelForImageClassification

from hf_bpmod.hub import HubAccess, explained_load_errors, hub_access, load_error_message

pytestmark = pytest.mark.compat  # huggingface_hub's offline switches and cache layout


def test_offline_names_read_the_cache_and_say_so():
    assert constants.HF_HUB_OFFLINE  # conftest.py
    access = hub_access(["hf-bpmod-tests/not-cached", None], cache_dir="c", revision="main")
    assert access.kwargs == {"cache_dir": "c", "revision": "main"} and "HF_HUB_OFFLINE" in access.problem


def test_an_unreachable_hub_is_tried_once_then_the_cache_only(unreachable_hub):
    access = hub_access(["hf-bpmod-tests/a", "hf-bpmod-tests/b"], token=None)
    assert len(unreachable_hub) == 1 and "Connect" in unreachable_hub[0]  # one try, a refused connection
    assert access.kwargs == {"token": None, "local_files_only": True}
    assert "unreachable" in access.problem and constants.ENDPOINT in access.problem


def test_local_paths_never_try_the_hub(tmp_path, unreachable_hub):
    access = hub_access([str(save_pretrained_vit(tmp_path / "vit")), None], cache_dir=None)
    assert unreachable_hub == [] and access == HubAccess({"cache_dir": None}, None)


def test_an_unreachable_hub_loads_a_cached_model_at_once(tmp_path, unreachable_hub, monkeypatch):
    """Every file of the load, the lookup of a peft adapter included, is read from the cache without asking the Hub
    (which huggingface_hub would retry for about 20 seconds)."""
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "hf-bpmod-tests/tiny-vit", save_pretrained_vit(tmp_path / "vit"))
    access = hub_access(["hf-bpmod-tests/tiny-vit"], cache_dir=str(cache))
    lookups = []
    real_download = transformers.utils.hub.hf_hub_download

    def download(*args, **kwargs):
        lookups.append(kwargs.get("local_files_only"))
        return real_download(*args, **kwargs)

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
    model = AutoModelForImageClassification.from_pretrained("hf-bpmod-tests/tiny-vit", **access.model_kwargs())
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert torch.equal(model.vit.embeddings.cls_token, saved.vit.embeddings.cls_token)
    assert lookups and all(lookups), lookups  # every file looked up in the cache only
    assert len(unreachable_hub) == 1


def test_a_missing_model_fails_with_the_offline_fix(tmp_path, unreachable_hub):
    access = hub_access(["hf-bpmod-tests/not-cached"], cache_dir=str(tmp_path))
    with pytest.raises(OSError, match="--model_name_or_path 'hf-bpmod-tests/not-cached' is neither a local") as error:
        with explained_load_errors("--model_name_or_path", "hf-bpmod-tests/not-cached", access):
            AutoConfig.from_pretrained("hf-bpmod-tests/not-cached", **access.kwargs)
    message = str(error.value)
    assert "the Hub (http://127.0.0.1:" in message and "HF_HUB_OFFLINE=1" in message
    assert "HF_HUB_ETAG_TIMEOUT" in message and "hf download hf-bpmod-tests/not-cached" in message
    assert isinstance(error.value.__cause__, OSError)  # the loader's own error stays attached


def test_load_errors_name_the_source_and_the_fix(tmp_path):
    reachable = HubAccess({}, None)
    error = OSError("boom")
    assert load_error_message("--config_name", str(tmp_path), reachable, error) == (
        f"--config_name {str(tmp_path)!r} could not be loaded: boom"
    )
    message = load_error_message("--config_name", "org/name", reachable, error)
    assert message.startswith("--config_name 'org/name' could not be loaded: boom Check the name")
    assert "HF_HUB_OFFLINE=1" in message
    with pytest.raises(ValueError, match="not a loading error"):  # other errors pass through unchanged
        with explained_load_errors("--config_name", "org/name", reachable):
            raise ValueError("not a loading error")
