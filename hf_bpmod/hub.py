"""Loading from the Hugging Face Hub when it may be out of reach.

``huggingface_hub`` retries every file of a model for half a minute or more when the Hub does not answer. Here the
Hub is tried once (:func:`hub_access`); if it is unreachable, every load uses the local cache only, so a cached
model loads at once and a missing one fails at once, with an error that says how to run offline
(:func:`explained_load_errors`). Names that are local paths never touch the Hub.

Example::

    access = hub_access([name], cache_dir=None, revision="main", token=None, trust_remote_code=False)
    with explained_load_errors("--model_name_or_path", name, access):
        config = AutoConfig.from_pretrained(name, **access.kwargs)
        model = AutoModelForImageClassification.from_pretrained(name, config=config, **access.model_kwargs())
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class HubAccess(NamedTuple):
    """How to load: the keyword arguments of every ``from_pretrained`` call, and why the Hub cannot be used (``None``
    when it can)."""

    kwargs: dict[str, Any]
    problem: str | None

    def model_kwargs(self) -> dict[str, Any]:
        """:attr:`kwargs` for a model's ``from_pretrained``, whose lookup of a peft adapter then reads the cache only
        too when the Hub cannot be used (:func:`hf_bpmod.compat.model_load_kwargs`)."""
        from .compat import model_load_kwargs

        return model_load_kwargs(self.kwargs)


def hub_unreachable_reason() -> str | None:
    """Try the Hub once (one HEAD request, no retries, ``HF_HUB_ETAG_TIMEOUT`` seconds at most); why it failed, or
    ``None`` if it answered."""
    from huggingface_hub import constants, utils

    try:
        response = utils.get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # requests' and httpx's connection and timeout errors share no base class
        return f"{type(error).__name__}: {error}"
    if response.status_code >= 500:
        return f"HTTP {response.status_code}"
    return None


def hub_access(names: Iterable[str | None], **kwargs: Any) -> HubAccess:
    """The loading arguments (``kwargs``, e.g. ``cache_dir``, ``revision``, ``token``) for ``names``. Where a name is
    not a local path and the Hub is unreachable (tried once here), they gain ``local_files_only=True``; with
    ``HF_HUB_OFFLINE`` set, ``huggingface_hub`` already reads the cache only. ``None`` names are skipped."""
    from huggingface_hub import constants

    remote = [name for name in names if name is not None and not os.path.exists(name)]
    if not remote:
        return HubAccess(dict(kwargs), None)
    if constants.HF_HUB_OFFLINE:
        return HubAccess(dict(kwargs), "HF_HUB_OFFLINE is set, so nothing is downloaded")
    reason = hub_unreachable_reason()
    if reason is None:
        return HubAccess(dict(kwargs), None)
    logger.warning(
        f"The Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({reason}): loading {remote} from the local "
        "cache only."
    )
    return HubAccess({**kwargs, "local_files_only": True}, f"the Hub ({constants.ENDPOINT}) is unreachable ({reason})")


def load_error_message(source: str, name: str, access: HubAccess, error: BaseException) -> str:
    """What went wrong loading ``name`` (given as ``source``, e.g. ``"--model_name_or_path"``) and how to fix it;
    for a Hub name, how to run offline."""
    if os.path.exists(name):
        return f"{source} {name!r} could not be loaded: {error}"
    offline = (
        "To run offline, pass a local folder (one written by save_pretrained), or download the model once where the "
        f"Hub is reachable (e.g. `hf download {name}`) and run with HF_HUB_OFFLINE=1 and the same cache (HF_HOME, or "
        "the cache_dir argument)."
    )
    if access.problem is not None:
        return (
            f"{source} {name!r} is neither a local folder nor in the local Hugging Face cache, and {access.problem}. "
            f"{offline} On a slow network, a larger HF_HUB_ETAG_TIMEOUT (seconds) gives the Hub longer to answer. "
            f"({type(error).__name__}: {error})"
        )
    return (
        f"{source} {name!r} could not be loaded: {error} Check the name (a Hub model id or a local folder), and the "
        f"token for a private model. {offline}"
    )


@contextlib.contextmanager
def explained_load_errors(source: str, name: str, access: HubAccess) -> Iterator[None]:
    """Re-raise a loading ``OSError`` (file not found, Hub unreachable, not in the cache) with its fix."""
    try:
        yield
    except OSError as error:
        raise OSError(load_error_message(source, name, access, error)) from error
