"""Models in eval mode for a block, each put back as it was after: teachers, scoring and generation all need it."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def evaluating(*models):
    """Eval mode (LoRA dropout off) without gradients for the block; each model back to its own mode after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
