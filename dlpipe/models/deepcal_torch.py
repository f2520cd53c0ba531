"""The DeepCAL-like geocoder in PyTorch (architecture and loss: see ``dlpipe.models``).

torch is imported when this module is: ``DeepCalTorch`` subclasses ``nn.Module``, so the class
cannot exist without it (as in ``dlpipe.loaders.torch_data``). ``dlpipe.models`` itself stays
framework-free; only code that asks for the PyTorch model imports this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.models import COORD_SCALE, VOCAB, check_weights, conv_layer_count, init_weights

torch = require("torch", "the DeepCAL PyTorch model")
nn = torch.nn


class DeepCalTorch(nn.Module):
    """``forward(input_ids, attention_mask)`` ([B, L] ints, any L) -> [B, 2] normalized coordinates.

    ``weights`` (from ``dlpipe.models.init_weights`` or ``weights_from_tf``) default to
    ``init_weights(seed)``, so a TF model built with the same seed has the same weights.
    """

    def __init__(
        self, vocab: int = VOCAB, *, weights: dict[str, np.ndarray] | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        w = init_weights(seed, vocab) if weights is None else weights
        check_weights(w, vocab)
        kernel, embed, channels = w["conv1_w"].shape
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, embed)
        self.convs = nn.ModuleList(
            nn.Conv1d(embed if i == 0 else channels, channels, kernel, padding=kernel // 2)
            for i in range(conv_layer_count(w))
        )
        self.dense = nn.Linear(channels, w["dense_w"].shape[1])
        self.out = nn.Linear(w["dense_w"].shape[1], 2)
        with torch.no_grad():  # canonical layouts are Keras's: conv (k, in, out), dense (in, out)
            self.embed.weight.copy_(torch.from_numpy(w["embed"]))
            for i, conv in enumerate(self.convs, 1):
                conv.weight.copy_(torch.from_numpy(w[f"conv{i}_w"]).permute(2, 1, 0))
                conv.bias.copy_(torch.from_numpy(w[f"conv{i}_b"]))
            for lin, name in ((self.dense, "dense"), (self.out, "out")):
                lin.weight.copy_(torch.from_numpy(w[f"{name}_w"]).T)
                lin.bias.copy_(torch.from_numpy(w[f"{name}_b"]))

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        ids = torch.remainder(input_ids.long(), self.vocab)
        mask = attention_mask.to(torch.float32).unsqueeze(1)  # [B, 1, L]
        # contiguous: conv backward on a transposed view is ~5x slower on CPU
        x = self.embed(ids).transpose(1, 2).contiguous() * mask  # [B, C, L]
        for conv in self.convs:
            x = torch.relu(conv(x)) * mask  # zero the padding again, so more of it changes nothing
        pooled = x.sum(dim=2) / mask.sum(dim=2).clamp_min(1.0)
        return self.out(torch.relu(self.dense(pooled)))


def weights_from_torch(model: DeepCalTorch) -> dict[str, np.ndarray]:
    """The model's current weights as the canonical dict (e.g. for ``build_tf_model(weights=...)``)."""

    def host(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    out = {"embed": host(model.embed.weight)}
    for i, conv in enumerate(model.convs, 1):
        out[f"conv{i}_w"] = host(conv.weight.permute(2, 1, 0))
        out[f"conv{i}_b"] = host(conv.bias)
    for lin, name in ((model.dense, "dense"), (model.out, "out")):
        out[f"{name}_w"], out[f"{name}_b"] = host(lin.weight.T), host(lin.bias)
    return out


def deepcal_loss(predictions: Any, labels: Any) -> Any:
    """MSE of ``predictions`` against (lat / 90, lon / 180); ``labels`` [B, 2] in degrees."""
    scale = torch.as_tensor(COORD_SCALE, device=labels.device)
    return torch.mean((labels.to(torch.float32) / scale - predictions) ** 2)


def torch_train_step(
    model: Any, optimizer: Any, batch: dict[str, Any], device: Any, *, return_float: bool = False
) -> Any:
    """One optimizer step on a batch dict (``input_ids``, ``attention_mask``, ``labels``).

    Tensors move to ``device`` asynchronously when they sit in pinned memory. The loss comes
    back as a detached tensor, so a loop of steps never waits for the device; ``return_float``
    reads it (one host sync) for when the value is wanted.
    """

    def move(t: Any) -> Any:
        return t.to(device, non_blocking=t.is_pinned())

    optimizer.zero_grad(set_to_none=True)
    pred = model(move(batch["input_ids"]), move(batch["attention_mask"]))
    loss = deepcal_loss(pred, move(batch["labels"]))
    loss.backward()
    optimizer.step()
    loss = loss.detach()
    return float(loss) if return_float else loss


__all__ = ["DeepCalTorch", "deepcal_loss", "torch_train_step", "weights_from_torch"]
