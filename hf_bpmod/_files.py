"""Files written whole or not at all."""

from __future__ import annotations

import os


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file that replaces it once synced: a crash leaves the old file
    or the new one, never half of either."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
