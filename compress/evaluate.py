"""Task metrics for any callable on preprocessed float batches (torch or a backend); what
they are per task is compress/tasks.py's."""
from __future__ import annotations

from typing import Callable

import numpy as np


def preprocess(images_u8: np.ndarray, manifest: dict) -> np.ndarray:
    """Raw uint8 NCHW pixels -> model input, using only what the manifest says."""
    inp = manifest["input"]
    c = images_u8.shape[1]
    mean = np.asarray(inp["mean"], np.float32).reshape(1, c, 1, 1)
    std = np.asarray(inp["std"], np.float32).reshape(1, c, 1, 1)
    return (images_u8.astype(np.float32) * np.float32(inp["scale"]) - mean) / std


def logits_of(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(run(x[i:i + batch]), np.float32)
                           for i in range(0, len(x), batch)])


def compare(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray, task=None, parity=None) -> dict:
    """The task's metrics on the labels and its agreement with a reference (classification:
    accuracy, top-1 agreement, max |delta logit|). parity: the gate's settings (tolerance)."""
    from compress.tasks import get_task
    return get_task(task).compare(logits, labels, reference, parity)
