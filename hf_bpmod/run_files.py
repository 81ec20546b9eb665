"""What a training run writes at the top of its ``output_dir``, and the names file systems take: the rules
``offset_log_file`` is checked against when the arguments are built.

* The log may not be, or lie inside, a file or folder of the run (:data:`RUN_FILES`, matched on the first component
  of its path, without case: macOS and Windows file systems ignore it). A fresh run removes the previous log (kept as
  a numbered copy), which would delete the lock; a ``checkpoint-*`` folder holding the log is rotated as a
  checkpoint; ``save_model`` overwrites a log named as one of its files.
* Each component of its path takes at most :data:`NAME_MAX` bytes (the file name :data:`SUFFIX_BYTES` fewer, for
  the suffixes of its numbered copies and temporary files), and the whole path in ``output_dir`` at most
  :data:`PATH_MAX`: a longer one would fail with an ``OSError`` at the first refresh.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase

from .peft_from_config import BASE_MODEL_DIR
from .run_lock import LOCK_NAME

#: The names written at the top of ``output_dir`` (glob patterns), read from the Trainer's ``save_model``,
#: ``_save_checkpoint``, ``save_metrics``, ``save_state`` and ``create_model_card``, transformers' and peft's
#: ``save_pretrained``, the TensorBoard and CodeCarbon callbacks, this package and the example script.
RUN_FILES: dict[str, tuple[str, ...]] = {
    "the run's lock": (LOCK_NAME,),
    "a checkpoint folder": ("checkpoint-*", "tmp-checkpoint-*"),
    "a file or folder the Trainer writes": (
        "training_args.bin", "trainer_state.json", "README.md", "*_results.json", "runs", "emissions.csv",
    ),
    "a file `save_model` writes": (
        "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*config.json", "adapter_*",
        "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
        "chat_template.*", "additional_chat_templates",
    ),
    "a file or folder the example script writes": ("predictions.csv", "block_accuracy.png", BASE_MODEL_DIR),
}  # fmt: skip
NAME_MAX = 255  # bytes of a file name: ext4, XFS, APFS, NTFS (255 UTF-16 units)
PATH_MAX = 260 if os.name == "nt" else 1024  # bytes of a path: Windows without long paths; macOS (Linux: 4096)
SUFFIX_BYTES = 15  # the longest suffix added to the log's name: ".tmp-<pid>" (pids up to 10 digits), ".<n>"


def run_file_owner(relative: str) -> tuple[str, str] | None:
    """``(what, pattern)`` if the normalised relative path ``relative`` is or lies inside a file or folder of the
    run (:data:`RUN_FILES`), else ``None``."""
    first = relative.replace("\\", "/").split("/")[0].casefold()
    for what, patterns in RUN_FILES.items():
        for pattern in patterns:
            if fnmatchcase(first, pattern.casefold()):
                return what, pattern
    return None


def length_problem(relative: str, output_dir: str) -> str | None:
    """What makes ``relative`` too long for file systems to write in ``output_dir``, or ``None``."""
    parts = relative.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        size = len(os.fsencode(part))
        limit = NAME_MAX - (SUFFIX_BYTES if i == len(parts) - 1 else 0)
        if size > limit:
            return (
                f"has a component of {size} bytes, more than the {limit} a file system takes there (names of at most "
                f"{NAME_MAX} bytes, and the log's numbered copies and temporary files add up to {SUFFIX_BYTES} to its "
                "file name)"
            )
    size = len(os.fsencode(os.path.abspath(os.path.join(output_dir, relative)))) + SUFFIX_BYTES
    if size > PATH_MAX:
        return (
            f"would be a path of {size} bytes in `output_dir` (with the {SUFFIX_BYTES} of the suffixes of its "
            f"numbered copies and temporary files), more than the {PATH_MAX} file systems take"
        )
    return None
