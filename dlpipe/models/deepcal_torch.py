"""The DeepCAL-like geocoder in PyTorch (architecture and loss: see ``dlpipe.models``).

torch is imported when this module is: ``DeepCalTorch`` subclasses ``nn.Module``, so the class
cannot exist without it (as in ``dlpipe.loaders.torch_data``). ``dlpipe.models`` itself stays
framework-free; only code that asks for the PyTorch model imports this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.models import COORD_SCALE, VOCAB, check_weights, conv_layer_count, init_weights

torch = require("torch", "the DeepCAL PyTorch model")
nn = torch.nn


class DeepCalTorch(nn.Module):
    """``forward(input_ids, attention_mask)`` ([B, L] ints, any L) -> [B, 2] normalized coordinates.

    Packed batches (see ``dlpipe.models``): ``forward(input_ids, segment_ids=..., num_segments=S)``
    -> [B, S, 2], or ``forward(input_ids, cu_seqlens=...)`` ([1, T] ids) -> [n, 2].
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
        # the modules hold the parameters (and name them in state_dict); forward runs the
        # convolutions channels-last itself (``_ConvReluMask``)
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

    def forward(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        segment_ids: Any = None,
        num_segments: int | None = None,
        cu_seqlens: Any = None,
    ) -> Any:
        if segment_ids is not None or cu_seqlens is not None:
            return self._packed(input_ids, segment_ids, num_segments, cu_seqlens)
        mask = attention_mask.unsqueeze(2).to(torch.float32)  # [B, L, 1]
        x = self._features(input_ids, mask)  # [B, L, C], zero at padding
        pooled = x.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.out(torch.relu(self.dense(pooled)))

    def _features(self, input_ids: Any, mask: Any) -> Any:
        """The embedding and convolutions, channels last: [B, L] ids, [B, L, 1] 0/1 mask ->
        [B, L, C], zero where the mask is.

        The embedding reads padding from an appended zero row (one lookup, no multiply); each
        convolution runs as a [B, C, 1, L] conv2d in channels_last memory, which is the
        [B, L, C] tensor itself (no transposed copies), and zeroes padding in place after its
        ReLU (``_ConvReluMask``).
        """
        padding = mask[..., 0] == 0
        ids = torch.remainder(input_ids.long(), self.vocab).masked_fill_(padding, self.vocab)
        weight = self.embed.weight
        x = nn.functional.embedding(ids, torch.cat([weight, weight.new_zeros(1, weight.shape[1])]))
        for conv in self.convs:
            x = _ConvReluMask.apply(x, conv.weight, conv.bias, mask, conv.padding[0])
        return x

    def _packed(self, input_ids: Any, seg: Any, num_segments: int | None, cu_seqlens: Any) -> Any:
        if cu_seqlens is not None:  # flattened: segment i + 1 for the tokens of record i
            cu = cu_seqlens.long()
            tokens = torch.arange(input_ids.shape[1], device=input_ids.device)
            seg = (torch.searchsorted(cu[1:], tokens, right=True) + 1).unsqueeze(0)
            num_segments = len(cu) - 1
        elif num_segments is None:
            raise ConfigError("segment_ids needs num_segments (segment_mask.shape[1])")
        # kernel // 2 zero positions between consecutive segments of a row, padding to the end:
        # then the padded path's own convolutions see zeros past every record's ends
        seg, gap = seg.long(), self.convs[0].padding[0]
        batch, width = seg.shape
        # the batch's most segments in a row, not num_segments, whose unused slots would widen
        # every row; read on CPU only, since elsewhere reading it waits for the device
        on_cpu = seg.device.type == "cpu" and seg.numel()
        most = max(int(seg.max()) if on_cpu else num_segments, 1)
        at = torch.arange(width, device=seg.device) + gap * (torch.where(seg > 0, seg, most) - 1)
        spread = (batch, max(width + gap * (most - 1), 1))  # >= 1: an empty batch
        ids = input_ids.long().new_zeros(spread).scatter_(1, at, input_ids.long())
        seg = seg.new_zeros(spread).scatter_(1, at, seg)
        x = self._features(ids, (seg > 0).unsqueeze(2).to(torch.float32))  # [B, L', C]
        if cu_seqlens is not None:  # one row of n records: a segment sum (one-hot: n x T x C)
            sums = x.new_zeros(num_segments + 1, x.shape[2])  # gaps go to a last, dropped, row
            sums.index_add_(0, torch.where(seg[0] > 0, seg[0] - 1, num_segments), x[0])
            counts = (cu[1:] - cu[:-1]).clamp_min(1).unsqueeze(1).to(sums.dtype)
            return self.out(torch.relu(self.dense(sums[:-1] / counts)))
        # the mean per segment: one batched matmul with the rows' one-hot segment matrices
        # (padding and gaps, id 0, are zero rows); on CPU cheaper than a scatter-add and its
        # gather
        slots = torch.arange(1, num_segments + 1, device=seg.device)
        onehot = (seg.unsqueeze(1) == slots[:, None]).to(x.dtype)  # [B, S, L']
        pooled = torch.bmm(onehot, x) / onehot.sum(2, keepdim=True).clamp_min(1.0)  # [B, S, C]
        return self.out(torch.relu(self.dense(pooled)))


class _ConvReluMask(torch.autograd.Function):
    """``relu(conv1d(x)) * mask`` on channels-last [B, L, C] activations, "same" padding.

    The convolution is a conv2d over [B, C, 1, L] views in channels_last memory: the [B, L, C]
    tensor as it is, the layout oneDNN convolves fastest on CPU (~2x the forward and backward
    speed of conv1d on a contiguous [B, C, L] copy). ReLU and mask act in place on the
    convolution's output, and the backward needs one pass for both: the output is positive
    exactly where the mask is 1 and the ReLU passes, so ``threshold_backward(g, out, 0)`` is
    ``g * mask * relu'``. Fewer passes and fewer fresh [B, L, C] buffers than the three autograd
    ops would take (on CPU each fresh buffer can cost page faults as well as the pass).
    """

    @staticmethod
    def forward(ctx: Any, x: Any, weight: Any, bias: Any, mask: Any, pad: int) -> Any:
        y = nn.functional.conv2d(_nchw(x), weight.unsqueeze(2), bias, padding=(0, pad))
        out = y.permute(0, 2, 3, 1).squeeze(1).relu_().mul_(mask)  # [B, L, C]
        ctx.save_for_backward(x, weight, out)
        ctx.pad = pad
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Any) -> Any:
        x, weight, out = ctx.saved_tensors
        # the dtype the convolution ran in (autocast may have cast x and weight to it)
        dtype = out.dtype
        grad_y = torch.ops.aten.threshold_backward(grad.to(dtype), out, 0)
        grad_y = _nchw(grad_y).contiguous(memory_format=torch.channels_last)  # no copy: [B, L, C]
        needs = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y, _nchw(x.to(dtype)), weight.to(dtype).unsqueeze(2), [weight.shape[0]],
            [1, 1], [0, ctx.pad], [1, 1], False, [0, 0], 1, [needs[0], needs[1], needs[2]],
        )  # fmt: skip
        if gx is not None:
            gx = gx.permute(0, 2, 3, 1).squeeze(1).to(x.dtype)
        if gw is not None:
            gw = gw.squeeze(2).to(weight.dtype)
        if gb is not None:
            gb = gb.to(weight.dtype)
        return gx, gw, gb, None, None


def _nchw(x: Any) -> Any:
    """[B, L, C] as the [B, C, 1, L] view a conv2d reads: channels_last when x is contiguous."""
    return x.unsqueeze(1).permute(0, 3, 1, 2)


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


def deepcal_packed_loss(predictions: Any, labels: Any, segment_mask: Any) -> Any:
    """``deepcal_loss`` over the real segments only ([B, S, 2], mask [B, S]): equal to
    ``deepcal_loss`` of the same records unpacked."""
    scale = torch.as_tensor(COORD_SCALE, device=labels.device)
    mask = segment_mask.to(torch.float32).unsqueeze(-1)
    err = (labels.to(torch.float32) / scale - predictions) ** 2
    return (err * mask).sum() / (2.0 * mask.sum()).clamp_min(1.0)


def batch_loss(model: Any, batch: dict[str, Any], device: Any) -> Any:
    """The loss of a batch dict in any of its forms, told apart by its keys: padded
    (``input_ids``, ``attention_mask``, ``labels`` [B, 2]), packed rows
    (``dlpipe.models.PACKED_FEATURES``, ``labels`` [B, S, 2]) or flattened (``FLAT_FEATURES``,
    ``labels`` [n, 2]); other keys are
    ignored. Tensors move to ``device`` asynchronously when they sit in pinned memory."""

    def get(key: str) -> Any:
        t = batch[key]
        return t.to(device, non_blocking=t.is_pinned())

    if "cu_seqlens" in batch:  # the mean over real records, 0 for an empty batch (not NaN)
        labels = get("labels")
        pred = model(get("input_ids"), cu_seqlens=get("cu_seqlens"))
        return deepcal_packed_loss(pred, labels, labels.new_ones(labels.shape[0]))
    if "segment_ids" in batch:
        mask = get("segment_mask")
        pred = model(get("input_ids"), segment_ids=get("segment_ids"), num_segments=mask.shape[1])
        return deepcal_packed_loss(pred, get("labels"), mask)
    return deepcal_loss(model(get("input_ids"), get("attention_mask")), get("labels"))


def make_optimizer(model: Any, lr: float = 1e-3) -> Any:
    """The DeepCAL step's optimizer: Adam (``lr`` 1e-3, as the TF side's), fused where PyTorch
    has a fused Adam for the parameters' device (CPU, CUDA): one kernel over all parameters
    instead of ~10 ops per tensor, ~1 ms less per CPU step here. The same update up to float
    rounding (~4e-8 apart after 20 steps)."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def torch_train_step(
    model: Any, optimizer: Any, batch: dict[str, Any], device: Any, *, return_float: bool = False
) -> Any:
    """One optimizer step on a batch dict (``input_ids``, ``attention_mask``, ``labels``, or a
    packed batch: see ``batch_loss``).

    The loss comes back as a detached tensor, so a loop of steps never waits for the device;
    ``return_float`` reads it (one host sync) for when the value is wanted.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, device)
    loss.backward()
    optimizer.step()
    loss = loss.detach()
    return float(loss) if return_float else loss


__all__ = [
    "DeepCalTorch",
    "batch_loss",
    "deepcal_loss",
    "deepcal_packed_loss",
    "make_optimizer",
    "torch_train_step",
    "weights_from_torch",
]
