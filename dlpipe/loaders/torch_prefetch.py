"""``DevicePrefetcher``: batches copied to the training device one step ahead.

A training step on a GPU should not wait for its batch's host-to-device copy. The prefetcher
keeps ``depth`` batches in flight: while the model trains on batch n, batch n + 1 is copied on a
side CUDA stream (from pinned memory, ``non_blocking``, so the copy overlaps the step). Before a
batch is handed out, the current stream waits for its copy, and every tensor is marked as used by
the current stream (``record_stream``) so that the caching allocator does not reuse its memory
while the step still reads it.

On a CPU device the same code runs with no stream: tensors already on the device are returned as
they are (``Tensor.to`` is a no-op there), so tests exercise the bookkeeping (order, state, epoch)
that a GPU run relies on.

Checkpoints stay exact: the loader behind the prefetcher is ``depth`` batches ahead of what the
training loop has received, so the prefetcher remembers the loader's ``state_dict`` as it was
after each batch it took, and ``state_dict()`` returns the one of the last batch handed out.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from dlpipe._deps import require
from dlpipe.errors import ConfigError

torch = require("torch", "dlpipe's PyTorch loader")

__all__ = ["DevicePrefetcher"]


def _to_device(batch: Any, device: Any, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, non_blocking) for v in batch)
    return batch


def _record_stream(batch: Any, stream: Any) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for v in batch.values():
            _record_stream(v, stream)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _record_stream(v, stream)


class DevicePrefetcher:
    """Iterate ``loader``'s batches on ``device``, the next ``depth`` copied ahead on a side
    stream. ``set_epoch``, ``state_dict``/``load_state_dict`` and ``len`` pass through to the
    loader (the state is the one matching the batches handed out, not those in flight)."""

    def __init__(self, loader: Any, device: Any, *, depth: int = 1) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"depth={depth!r}; use an int >= 1 (batches copied ahead)")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device={device!r} is not a torch device ({e}); use e.g. 'cuda', 'cuda:1' or 'cpu'") \
                from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}, but torch sees no CUDA device; use device='cpu' or None")
        self.loader = loader
        self.depth = depth
        self._state: Any = None  # the loader's state after the last batch handed out

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:  # nothing handed out yet in this process
            return self.loader.state_dict()
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = None
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        stateful = hasattr(self.loader, "state_dict")
        ahead: collections.deque = collections.deque()
        batches = iter(self.loader)

        def take() -> bool:
            try:
                batch = next(batches)
            except StopIteration:
                return False
            state = self.loader.state_dict() if stateful else None
            if cuda:
                with torch.cuda.stream(stream):
                    batch = _to_device(batch, self.device, True)
                    event = torch.cuda.Event()
                    event.record(stream)
            else:
                batch, event = _to_device(batch, self.device, False), None
            ahead.append((batch, event, state))
            return True

        for _ in range(self.depth):
            if not take():
                break
        while ahead:
            batch, event, state = ahead.popleft()
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                _record_stream(batch, current)
            take()  # the next copy starts before this batch's step
            self._state = state
            yield batch
