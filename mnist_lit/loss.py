"""The loss: plain torch, as in the original project."""

import torch
import torch.nn.functional as F


def nll_loss(log_probs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Negative log-likelihood of the targets under the net's log-softmax output, averaged over the batch.

    With ``label_smoothing`` > 0 the target puts that much probability mass evenly on all classes (the same
    value as ``F.cross_entropy(..., label_smoothing=)``, without its extra log_softmax).
    """
    loss = F.nll_loss(log_probs, targets, reduction="mean")
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_probs.mean(dim=1).mean()
    return loss
