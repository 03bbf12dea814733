"""mnist_lit.net: the original architecture and the registry."""

import pytest
import torch

from mnist_lit.errors import UserError
from mnist_lit.net import NETS, LeNet, build_net


def test_lenet_output_is_log_probabilities_of_ten_classes():
    net = LeNet()
    out = net(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)


def test_lenet_has_the_original_layers():
    net = LeNet()
    assert [tuple(p.shape) for p in net.parameters()] == [
        (20, 1, 5, 5),
        (20,),
        (50, 20, 5, 5),
        (50,),
        (500, 800),
        (500,),
        (10, 500),
        (10,),
    ]
    assert sum(p.numel() for p in net.parameters()) == 431_080


@pytest.mark.parametrize("name", list(NETS))
def test_every_registered_net_gives_log_probabilities(name):
    net = build_net(name).eval()
    out = net(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(4), atol=1e-5)


def test_registry():
    assert isinstance(build_net("lenet"), NETS["lenet"])
    with pytest.raises(UserError, match="unknown net"):
        build_net("resnet9000")


def test_multi_column_net_columns_learn_on_their_own():
    """In training mode the loss is the columns' mean loss: each column's gradient is its own loss's / K."""
    from mnist_lit.loss import nll_loss

    torch.manual_seed(0)
    net = build_net("wide_x2").train()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    nll_loss(net(x), y, 0.1).backward()
    joint = [p.grad.clone() for p in net.columns[0].parameters()]
    net.zero_grad()
    (nll_loss(net.columns[0](x), y, 0.1) / 2).backward()
    alone = [p.grad for p in net.columns[0].parameters()]
    assert all(torch.allclose(j, a, atol=1e-6) for j, a in zip(joint, alone))
    assert not torch.allclose(net.columns[0].features[0].weight, net.columns[1].features[0].weight)
