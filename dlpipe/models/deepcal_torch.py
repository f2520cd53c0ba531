"""The DeepCAL-like geocoder in PyTorch (see ``dlpipe.models``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.models import CHANNELS, COORD_SCALE, EMBED, HIDDEN, KERNEL, VOCAB, init_weights

torch = require("torch", "the DeepCAL PyTorch model")
nn = torch.nn


class DeepCalTorch(nn.Module):
    """``forward(input_ids, attention_mask)`` ([B, L], any L) -> [B, 2] normalized coordinates."""

    def __init__(self, vocab: int = VOCAB, weights: dict[str, np.ndarray] | None = None, seed: int = 0) -> None:
        super().__init__()
        w = init_weights(seed, vocab) if weights is None else weights
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, EMBED)
        self.conv1 = nn.Conv1d(EMBED, CHANNELS, KERNEL, padding=KERNEL // 2)
        self.conv2 = nn.Conv1d(CHANNELS, CHANNELS, KERNEL, padding=KERNEL // 2)
        self.dense = nn.Linear(CHANNELS, HIDDEN)
        self.out = nn.Linear(HIDDEN, 2)
        with torch.no_grad():  # canonical layout: conv kernels (k, in, out), dense (in, out)
            self.embed.weight.copy_(torch.from_numpy(w["embed"]))
            for conv, name in ((self.conv1, "conv1"), (self.conv2, "conv2")):
                conv.weight.copy_(torch.from_numpy(w[f"{name}_w"]).permute(2, 1, 0))
                conv.bias.copy_(torch.from_numpy(w[f"{name}_b"]))
            for lin, name in ((self.dense, "dense"), (self.out, "out")):
                lin.weight.copy_(torch.from_numpy(w[f"{name}_w"]).T)
                lin.bias.copy_(torch.from_numpy(w[f"{name}_b"]))
        self.register_buffer("scale", torch.from_numpy(COORD_SCALE), persistent=False)

    def forward(self, input_ids, attention_mask):
        ids = torch.remainder(input_ids.long(), self.vocab)
        mask = attention_mask.to(torch.float32).unsqueeze(1)  # [B, 1, L]
        x = self.embed(ids).transpose(1, 2).contiguous() * mask  # [B, C, L]; contiguous: conv backward is slow otherwise
        x = torch.relu(self.conv1(x)) * mask  # zero the padding again so more of it changes nothing
        x = torch.relu(self.conv2(x)) * mask
        pooled = x.sum(dim=2) / mask.sum(dim=2).clamp_min(1.0)
        return self.out(torch.relu(self.dense(pooled)))


def deepcal_loss(predictions, labels):
    """MSE of coordinates divided by (90, 180); ``labels`` in degrees."""
    target = labels.to(torch.float32) / torch.as_tensor(COORD_SCALE, device=labels.device)
    return torch.mean((target - predictions) ** 2)


def torch_train_step(model, optimizer, batch: dict[str, Any], device) -> Any:
    """One optimizer step on a batch dict; returns the loss tensor (no host sync)."""
    def move(t):
        return t.to(device, non_blocking=True)

    optimizer.zero_grad(set_to_none=True)
    pred = model(move(batch["input_ids"]), move(batch["attention_mask"]))
    loss = deepcal_loss(pred, move(batch["labels"]))
    loss.backward()
    optimizer.step()
    return loss.detach()
