"""Rows of a 28×28 image read as a sequence of 28 tokens through ``nn.MultiheadAttention`` with
PyTorch's default layout, ``batch_first=False``: the forward permutes to (seq, batch, dim) and back."""
import torch
from torch import nn


class RowAttention(nn.Module):
    def __init__(self, dim=32, heads=4, num_classes=10):
        super().__init__()
        self.embed = nn.Linear(28, dim)
        self.pos = nn.Parameter(torch.zeros(28, 1, dim))
        self.attn = nn.MultiheadAttention(dim, heads)  # batch_first=False: (seq, batch, dim)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x.view(x.shape[0], 28, 28))   # (batch, seq, dim)
        x = x.permute(1, 0, 2) + self.pos            # (seq, batch, dim)
        attended, _ = self.attn(x, x, x)
        x = self.norm(x + attended)
        x = x + torch.relu(self.ff(x))
        return self.head(x.mean(dim=0))


def make():
    return RowAttention()

