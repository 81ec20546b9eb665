"""Clear errors for the parts of the package that need the ``examples`` extra."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def require_extra(part: str, extra: str = "examples") -> Iterator[None]:
    """Turn an ``ImportError`` inside the block into one that names the missing package and the extra to install."""
    try:
        yield
    except ImportError as error:
        raise ImportError(
            f"{part} needs `{error.name}`, which comes with hf_bpmod's `{extra}` extra: "
            f'pip install "hf_bpmod[{extra}]" (or, from a clone, pip install ".[{extra}]").'
        ) from error
