"""One check for every resumable loader object, in either framework (as torchdata's
``run_test_save_load_state``): stopped after k items and restored into a fresh object, the
stream goes on exactly as an uninterrupted one.

``run_save_load_state(make, stops)`` runs ``make()`` to the end once; then for each k in
``stops``: a fresh object yields k items, its state is saved, the same iterator goes on (saving
must not disturb it), another fresh object loads the state and yields the rest. Both ways the
k items plus the rest must equal the uninterrupted run, item by item.

How to save and load is a pair of functions; two pairs are here: ``STATE_DICT`` (the
``state_dict()`` / ``load_state_dict()`` protocol of PyTorch, torchdata and dlpipe's datasets)
and ``tf_checkpoint(directory)`` (``tf.train.Checkpoint(iterator=...)`` of a ``tf.data``
iterator).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SaveLoad:
    """``save(obj, iterator) -> state`` after some items; ``resume(fresh_obj, state, start)`` ->
    the iterator over the items that follow, where ``start()`` begins iterating ``fresh_obj``
    (after loading the state into the object, or before restoring the iterator's)."""

    save: Callable[[Any, Iterator[Any]], Any]
    resume: Callable[[Any, Any, Callable[[], Iterator[Any]]], Iterator[Any]]


def _load_state_dict(obj: Any, state: Any, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    obj.load_state_dict(state)
    return start()


STATE_DICT = SaveLoad(save=lambda obj, it: copy.deepcopy(obj.state_dict()), resume=_load_state_dict)


def tf_checkpoint(directory: str) -> SaveLoad:
    """Save and restore a ``tf.data`` iterator with ``tf.train.Checkpoint(iterator=...)``."""
    import tensorflow as tf

    counter = itertools.count()

    def save(obj: Any, it: Iterator[Any]) -> str:
        return tf.train.Checkpoint(iterator=it).write(f"{directory}/ckpt-{next(counter)}")

    def resume(obj: Any, path: str, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        it = start()
        tf.train.Checkpoint(iterator=it).read(path).assert_consumed()
        return it

    return SaveLoad(save, resume)


def plain(item: Any) -> Any:
    """An item as nested lists / dicts / tuples of Python values, to compare with ``==``
    (tensors of either framework and numpy arrays through ``tolist``)."""
    if isinstance(item, dict):
        return {k: plain(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return tuple(plain(v) for v in item)
    if hasattr(item, "numpy") and callable(item.numpy):
        item = item.numpy()
    return item.tolist() if hasattr(item, "tolist") else item


def run_save_load_state(
    make: Callable[[], Any],
    stops: Iterable[int],
    *,
    how: SaveLoad = STATE_DICT,
    prepare: Callable[[Any], None] | None = None,
    key: Callable[[Any], Any] = plain,
    restore_into: Callable[[], Any] | None = None,
) -> list[Any]:
    """Check ``make()``'s objects resume exactly after each k in ``stops`` (module docstring).

    ``prepare(obj)`` runs on every object just before it is iterated (so after ``load_state_dict``,
    where a training loop calls ``set_epoch``). ``key`` maps an item to what is compared.
    ``restore_into()`` makes the fresh object the state is loaded into (default ``make()``): e.g. a
    never iterated one, where ``make()`` gives one already iterated once (a checkpoint taken in
    its second epoch). Returns the uninterrupted run's keys.
    """

    def start(obj: Any) -> Iterator[Any]:
        if prepare is not None:
            prepare(obj)
        return iter(obj)

    full = [key(x) for x in start(make())]
    for k in stops:
        assert 0 <= k <= len(full), (k, len(full))
        obj = make()
        it = start(obj)
        head = [key(next(it)) for _ in range(k)]
        state = how.save(obj, it)
        assert head + [key(x) for x in it] == full, f"saving after {k} items changed the stream"
        del it
        other = (restore_into or make)()
        rest = [key(x) for x in how.resume(other, state, lambda o=other: start(o))]
        assert len(head + rest) == len(full), (
            f"resumed after {k} items: {len(head + rest)} items, uninterrupted {len(full)}"
        )
        for i, (a, b) in enumerate(zip(head + rest, full)):
            assert a == b, f"resumed after {k} items: item {i} differs"
    return full
