"""The sibling module that ``sibling_net.py`` imports by name (``import model_defs``): it lies next
to it and is not itself passed to ``--import``."""
import torch
from torch import nn


def swish(x):
    return x * torch.sigmoid(x)


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return swish(self.conv(x))
