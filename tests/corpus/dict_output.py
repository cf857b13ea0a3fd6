"""A CNN whose forward returns a dict, ``{"logits": …, "features": …}``, as multi-head or
Hugging Face-style models do."""
import torch.nn.functional as F
from torch import nn


class DictNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.proj = nn.Linear(32, 64)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        features = F.relu(self.proj(x.mean(dim=(2, 3))))
        return {"logits": self.classifier(features), "features": features}


def make():
    return DictNet()

