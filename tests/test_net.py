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
