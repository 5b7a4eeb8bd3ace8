"""One progress bar for the whole library, shown only on the main process (as accelerate does).

Every long loop (inversion, distillation, teacher training, quantization reports) asks this helper
for its bar, so that ``accelerate launch`` with N processes prints one bar, not N, and a caller can
switch all of them off with ``enabled=False`` (or ``TQDM_DISABLE=1``).
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def is_main_process() -> bool:
    """Whether this is the main process of a launch (torchrun/accelerate set ``RANK``; alone it is)."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(total: int | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar, disabled off the main process or when ``enabled`` is false (updates are then no-ops).

    Otherwise ``disable`` is left to tqdm, so ``TQDM_DISABLE=1`` still silences every bar.
    """
    if not (enabled and is_main_process()):
        kwargs["disable"] = True
    return tqdm(total=total, **kwargs)
