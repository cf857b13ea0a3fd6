"""A model saved whole with ``torch.save(model, path)`` from a script: run as
``python whole_pickle.py OUT.pt`` the class lives in ``__main__``, so the pickle refers to
``__main__.ScriptNet``. The same file, given to ``--import``, defines the class again."""
import sys

import torch
import torch.nn.functional as F
from torch import nn


class ScriptNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.out = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 4)
        x = torch.flatten(x, 1)
        return self.out(F.relu(self.fc(x)))



if __name__ == "__main__":
    torch.manual_seed(0)
    model = ScriptNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.eval(), sys.argv[1])
    if len(sys.argv) > 2:  # the same weights as a state dict, for the test to compare against
        torch.save(model.state_dict(), sys.argv[2])
