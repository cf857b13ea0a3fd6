"""User-defined blocks (conv + BatchNorm + ReLU, a residual wrapper) stacked in an
``nn.Sequential``: the model is the Sequential itself, its layers named ``0.conv``, ``1.body.conv``…"""
from torch import nn


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def make(num_classes=10, width=16):
    return nn.Sequential(
        ConvBNReLU(3, width),
        Residual(ConvBNReLU(width, width)),
        ConvBNReLU(width, 2 * width, stride=2),
        Residual(ConvBNReLU(2 * width, 2 * width)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )

