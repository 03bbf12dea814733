"""The loss: plain torch, as in the original project."""

import torch
import torch.nn.functional as F


def nll_loss(log_probs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Negative log-likelihood of the targets under the net's log-softmax output, averaged over the batch.

    With ``label_smoothing`` > 0 the target puts that much probability mass evenly on all classes.
    (cross_entropy applies log_softmax first, which leaves log-probabilities unchanged.)
    """
    if label_smoothing:
        return F.cross_entropy(log_probs, targets, label_smoothing=label_smoothing)
    return F.nll_loss(log_probs, targets, reduction="mean")
