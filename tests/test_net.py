"""mnist_lit.net: the original architecture and the registry."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_lit.errors import UserError
from mnist_lit.net import NETS, LeNet, build_net, draws_random_numbers, net_options


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


def test_lenet_dropout_is_an_option_off_by_default():
    torch.manual_seed(0)
    plain = LeNet()
    assert inspect.signature(LeNet).parameters["dropout"].default == 0.0  # the one place its default lives
    torch.manual_seed(0)
    dropped = build_net("lenet", options={"dropout": 0.5})
    assert dropped.state_dict().keys() == plain.state_dict().keys()  # no weights of its own
    x = torch.randn(8, 1, 28, 28)
    state = torch.get_rng_state()
    assert torch.equal(plain.train()(x), plain.eval()(x))  # off: training draws nothing, changes nothing
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(dropped.eval()(x), plain.eval()(x))  # evaluation: no dropout
    assert not torch.equal(dropped.train()(x), plain.train()(x))  # training: half the hidden values zeroed


@pytest.mark.parametrize("name", list(NETS))
def test_every_nets_options_are_its_constructors_arguments(name):
    params = inspect.signature(NETS[name]).parameters
    assert net_options(name) == [arg for arg in params if arg != "num_classes"]
    options = {arg: params[arg].default for arg in net_options(name)}  # the defaults, given explicitly
    torch.manual_seed(0)
    given = build_net(name, options=options)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(given.state_dict().values(), build_net(name).state_dict().values()))


def test_bad_net_options_are_one_line():
    with pytest.raises(UserError, match=r"^model.net_options: lenet has no option 'drop'; it accepts: dropout$"):
        build_net("lenet", options={"drop": 0.1})
    with pytest.raises(UserError, match=r"^model.net_options: linear has no option 'width'; it accepts: none$"):
        build_net("linear", options={"width": 3})
    with pytest.raises(UserError, match=r"^model.net_options for lenet: dropout must be in \[0, 1\) \(got 1.5\)$"):
        build_net("lenet", options={"dropout": 1.5})
    with pytest.raises(UserError, match="model.net_options for lenet: could not convert string to float"):
        build_net("lenet", options={"dropout": "a lot"})
    assert build_net("wide", options={"width": 8}).features[0].out_channels == 8


@pytest.mark.parametrize("name", NETS)
def test_only_a_net_with_dropout_draws_random_numbers(name):
    """At their defaults the nets draw nothing (no per-step seeding callback is added for them)."""
    assert not draws_random_numbers(build_net(name))
    assert draws_random_numbers(nn.Sequential(build_net(name), nn.Dropout(0.1)))
    assert draws_random_numbers(LeNet(dropout=0.3))


def test_residual_net_size_and_width():
    net = build_net("residual")
    assert sum(p.numel() for p in net.parameters()) == 308_074  # the figure in its docstring
    assert net.features(torch.randn(2, 1, 28, 28)).shape == (2, 128)  # 4 x width channels, pooled to 1 x 1
    narrow = build_net("residual", options={"width": 8})
    assert narrow.features(torch.randn(2, 1, 28, 28)).shape == (2, 32) and narrow.classifier.in_features == 32


def test_lenet_computes_the_original_forward():
    """conv-pool-relu twice, fc-relu, fc, log_softmax: the original's forward written out with LeNet's weights."""
    torch.manual_seed(0)
    net, x = LeNet().eval(), torch.randn(6, 1, 28, 28)
    h = F.relu(F.max_pool2d(F.conv2d(x, net.conv1.weight, net.conv1.bias), 2))
    h = F.relu(F.max_pool2d(F.conv2d(h, net.conv2.weight, net.conv2.bias), 2))
    h = F.relu(F.linear(h.flatten(1), net.fc1.weight, net.fc1.bias))
    expected = F.log_softmax(F.linear(h, net.fc2.weight, net.fc2.bias), dim=1)
    torch.testing.assert_close(net(x), expected)
