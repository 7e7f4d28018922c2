"""Types of the C extension built from ``_fold.c`` (see `cloud_coordinator.checked_sums`)."""

from typing import Any

import numpy as np
from typing_extensions import Buffer

def fold_f32(
    acc: Buffer | np.ndarray[Any, Any],
    update: Buffer | np.ndarray[Any, Any],
    scale: float,
    threads: int,
) -> bool:
    """acc += scale * update in place (float32 buffers of equal size); True if all finite."""
