"""The networks: plain torch modules (no Lightning), so they can be exported and reused anywhere."""

import torch
import torch.nn.functional as F
from torch import nn

from mnist_lit.errors import UserError
from mnist_lit.schema import signature_types


class LeNet(nn.Module):
    """The original project's CNN (431k parameters); returns log-probabilities.

    Conv2d(1,20,5) -> MaxPool2 -> ReLU -> Conv2d(20,50,5) -> MaxPool2 -> ReLU
    -> Linear(800,500) -> ReLU -> Linear(500,10) -> log_softmax.
    ``dropout``: the probability of zeroing each of the 500 hidden values in training (0: the original net, no
    dropout at all, so no random draws).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
        self.dropout = float(dropout)
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)  # 28x28 -> 24x24, pooled to 12x12
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)  # 12x12 -> 8x8, pooled to 4x4
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised images, shape (batch, 1, 28, 28)."""
        # Pooled before the ReLU: the same result (max and ReLU commute), the ReLU on 4x fewer values.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        if self.dropout:
            x = F.dropout(x, self.dropout, self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class LinearNet(nn.Module):
    """Softmax regression: one Linear(784, 10) layer, the classic baseline (90.4 % after the benchmark's one
    epoch). Nearly free to run, so ``benchmarks/benchmark.py --net linear`` times what the code around a net costs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


def conv_bn(c_in: int, c_out: int, kernel: int, padding: int = 0, pool: bool = False) -> list[nn.Module]:
    """Conv (no bias: BN brings its own) -> BN -> ReLU, with ``pool`` a 2x2 max-pool before the ReLU: the same
    result as after it (max and ReLU commute) with the ReLU on 4x fewer values (WideNet's step ~10 % faster)."""
    layers = [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False), nn.BatchNorm2d(c_out)]
    return [*layers, nn.MaxPool2d(2), nn.ReLU()] if pool else [*layers, nn.ReLU()]


class SlimNet(nn.Module):
    """A slimmer CNN with BatchNorm for the ``fast`` recipe (18k parameters, ~1.1M multiply-adds per image,
    half of LeNet's): Conv(1,16,5)-BN-MaxPool2-ReLU -> Conv(16,32,5)-BN-MaxPool2-ReLU -> Linear(512,10)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16, 5, pool=True),  # 28 -> 24, pooled to 12
            *conv_bn(16, 32, 5, pool=True),  # 12 -> 8, pooled to 4
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(self.features(x).flatten(1)), dim=1)


def bn_classifier(features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Flatten -> Linear(features, hidden)-BN-ReLU -> Linear(hidden, classes)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class WideNet(nn.Module):
    """A wider, deeper BatchNorm CNN for the ``strong`` recipe (898k parameters, ~36M multiply-adds per image;
    affordable on a CPU with bfloat16 units under bf16 autocast and channels_last):
    Conv5(64) -> MaxPool2 -> Conv3(128, padded) -> Conv3(128) -> Conv3(128) -> MaxPool2
    -> Linear(2048,256)-BN-ReLU -> Linear(256,10)."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, width, 5, pool=True),  # 28 -> 24, pooled to 12
            *conv_bn(width, 2 * width, 3, padding=1),  # -> 12
            *conv_bn(2 * width, 2 * width, 3),  # -> 10
            *conv_bn(2 * width, 2 * width, 3, pool=True),  # -> 8, pooled to 4
        )
        self.classifier = bn_classifier(2 * width * 4 * 4, 256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


class ResidualBlock(nn.Module):
    """Two Conv3-BN with a shortcut (He et al., 2016), ReLU after the sum; ``stride`` 2 halves the size, and then
    (or with a change of channels) the shortcut is a strided Conv1-BN."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResidualNet(nn.Module):
    """A small residual net, unlike WideNet in its shape (an ensemble's members should differ): 308k parameters,
    ~37M multiply-adds per image (``width`` 32):
    Conv3(32)-BN-ReLU -> Block(32) at 28x28 -> Block(64, stride 2) at 14x14 -> Block(128, stride 2) at 7x7
    -> global average pool -> Linear(128, 10); each Block two Conv3-BN with a shortcut."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, width, 3, padding=1),
            ResidualBlock(width, width),
            ResidualBlock(width, 2 * width, stride=2),  # 28 -> 14
            ResidualBlock(2 * width, 4 * width, stride=2),  # 14 -> 7
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


# Architecture name (as saved in checkpoints) -> class. New architectures join here; a constructor argument
# other than num_classes is an option of that net (model.net_options), its default given in the constructor only.
NETS = {
    "lenet": LeNet,
    "slim": SlimNet,
    "wide": WideNet,
    "linear": LinearNet,
    "residual": ResidualNet,
}


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def draws_random_numbers(net: nn.Module) -> bool:
    """Whether a net draws random numbers in training (a dropout layer, or a ``dropout`` option above 0)."""
    return any(isinstance(m, DROPOUTS) and m.p > 0 or getattr(m, "dropout", 0) for m in net.modules())


def net_options(name: str) -> list[str]:
    """The options a registered net accepts: its constructor's arguments but num_classes."""
    return list(net_option_types(name))


def net_option_types(name: str) -> dict[str, object]:
    """The options of a registered net with the types its constructor declares."""
    return {arg: hint for arg, hint in signature_types(NETS[name]).items() if arg != "num_classes"}


def build_net(name: str, num_classes: int = 10, options: dict | None = None) -> nn.Module:
    """The net ``name`` of the registry, built with ``options`` (keyword arguments of its constructor)."""
    if name not in NETS:
        raise UserError(f"unknown net {name!r}; choose one of: {', '.join(NETS)}")
    options = dict(options or {})
    accepted = net_options(name)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise UserError(
            f"model.net_options: {name} has no option {unknown[0]!r}; it accepts: {', '.join(accepted) or 'none'}"
        )
    try:
        return NETS[name](num_classes, **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.net_options for {name}: {err}") from None
