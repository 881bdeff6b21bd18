"""Small real CNNs and data for optimizer tests."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, c1=8, c2=12, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def batches(n, seed=0, batch=4, size=8, classes=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g, dtype=dtype),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return SmallCNN().to(dtype)
