"""The loss: plain torch, as in the original project."""

import torch
import torch.nn.functional as F


def nll_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the targets under the net's log-softmax output, averaged over the batch."""
    return F.nll_loss(log_probs, targets, reduction="mean")
