"""mnist_lit.loss: negative log-likelihood, a true mean over the batch."""

import math

import torch

from mnist_lit.loss import nll_loss


def test_nll_loss_is_the_mean_negative_log_probability_of_the_targets():
    log_probs = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    targets = torch.tensor([0, 1, 1])
    expected = -(math.log(0.5) + math.log(0.1) + math.log(0.8)) / 3
    assert nll_loss(log_probs, targets).item() == torch.tensor(expected).item()


def test_label_smoothing_matches_cross_entropy():
    torch.manual_seed(0)
    log_probs, targets = torch.randn(6, 10).log_softmax(1), torch.randint(0, 10, (6,))
    expected = torch.nn.functional.cross_entropy(log_probs, targets, label_smoothing=0.1)
    assert torch.allclose(nll_loss(log_probs, targets, 0.1), expected)
