"""The guide's own training loop, reproduced faithfully: the baseline every speed claim is measured against.

``simple_network`` below is the guide's function (minus tqdm's progress bars), fed by a
``DataLoader`` over a ``TensorDataset`` with batch size 1 exactly as the guide builds it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def move_to(obj: torch.Tensor, device: torch.device) -> torch.Tensor:
    return obj.to(device)


def simple_network(
    model: nn.Module,
    loss_func: nn.Module,
    training_loader: DataLoader[tuple[torch.Tensor, ...]],
    epochs: int = 20,
    device: str = "cpu",
) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    model.to(device)
    running_loss = 0.0
    for _epoch in range(epochs):
        model = model.train()
        running_loss = 0.0
        for inputs, labels in training_loader:
            inputs = move_to(inputs, torch.device(device))
            labels = move_to(labels, torch.device(device))
            optimizer.zero_grad()
            y_hat = model(inputs)
            loss = loss_func(y_hat, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / len(training_loader)


def moons_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 2))


def train_moons(x: np.ndarray, y: np.ndarray, epochs: int = 300, seed: int = 0) -> tuple[nn.Module, float]:
    """The guide's 2x30 Tanh make_moons experiment; returns (model, last epoch's mean loss)."""
    torch.manual_seed(seed)
    dataset = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))
    model = moons_model()
    loss = simple_network(model, nn.CrossEntropyLoss(), DataLoader(dataset), epochs=epochs)
    return model, loss


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor(x, dtype=torch.float32))
    return float((logits.argmax(dim=1).numpy() == y).mean())
