"""Shared computations over the interaction data: aggregation, losses, sampling and
training loops used by the model components."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def mean_of_items(train: sp.csr_matrix, item_vectors: np.ndarray,
                  item_usable: np.ndarray | None = None) -> np.ndarray:
    """Per user, the L2-normalised mean of the vectors of their training items.

    Only items flagged in `item_usable` count; users with no usable item get a zero row.
    Interaction counts are not used as weights: a repeat visit is not twice the taste.
    """
    binary = (train > 0).astype(np.float32)
    if item_usable is not None:
        binary = binary @ sp.diags(item_usable.astype(np.float32))
    summed = np.asarray(binary @ item_vectors, dtype=np.float32)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.divide(summed, norms, out=np.zeros_like(summed), where=norms > 0)
