"""One Linear applied twice in the forward (weights shared between two depths), the way
users write a weight-tied recurrence without an RNN module."""
import torch
from torch import nn


class SharedMLP(nn.Module):
    def __init__(self, hidden=64, num_classes=10):
        super().__init__()
        self.inp = nn.Linear(28 * 28, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = torch.relu(self.inp(x.flatten(1)))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))  # the same module, a second time
        return self.head(x)


def make(hidden=64):
    return SharedMLP(hidden)

