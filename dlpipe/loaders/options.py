"""What both loader front ends share: one ``LoaderOptions``, checked once, and one shuffle rule.

``to_tf_dataset`` and ``to_torch_dataloader`` keep their own signatures (HF's and PyTorch's
names: ``drop_remainder`` / ``drop_last``); each maps its arguments into a ``LoaderOptions``,
whose constructor validates them with one set of messages (each names the parameter, the value
given and what is valid), and reads the checked values from it. What only one framework has
(TF's graph ``collate_fn``, ``cycle_length``; PyTorch's workers, ``pin_memory``) stays in that
front end.

``resolve_shuffle`` is the shuffle rule of both (see there), over the one public view of a
dataset's shuffle state, ``ShardDataset.shuffle_config`` (a ``ShuffleConfig``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dlpipe.columns import ColumnEncoding
from dlpipe.defaults import MASK_COLUMN
from dlpipe.errors import ConfigError
from dlpipe.loaders.collate import default_boundaries
from dlpipe.loaders.common import UNEVEN
from dlpipe.loaders.packing import DEFAULT_SEGMENTS, LAYOUTS, PackingOptions

__all__ = ["LoaderOptions", "ShuffleConfig", "resolve_shuffle"]

PADDING_SIDES = ("right", "left")
PACK_WINDOW = 16384  # records packed together (dlpipe.loaders.packed)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(value: str | Sequence[str] | None, param: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) for n in names) or len(set(names)) < len(names):
        raise ConfigError(f"{param}={list(names)!r} contains duplicates or non-strings; "
                          "use distinct column names")
    return names


@dataclass(frozen=True)
class LoaderOptions:
    """The options both front ends share, validated when made (``validate``).

    - batching: ``batch_size`` (None: unbatched records, tf.data only), ``drop_last`` (TF's
      ``drop_remainder``: drop the epoch's short last batch);
    - padding (``dlpipe.loaders.collate.collate``'s rule): ``pad_to_multiple_of``,
      ``padding_side``, ``bucket_boundaries`` (a strictly increasing tuple of lengths, or
      ``"auto"``; made concrete by ``boundaries``), ``return_attention_mask``;
    - shuffle: ``shuffle`` and ``seed`` (see ``resolve_shuffle``);
    - ranks: ``world_size`` and ``rank`` (both or neither; None until the front end resolves
      them, see ``with_world``), ``uneven`` ('pad' or 'drop');
    - columns: ``columns`` and ``label_cols`` (HF ``to_tf_dataset``'s selection and split; None:
      every loaded column);
    - packing (``validate_packing``; ``dlpipe.loaders.packed``): ``packing`` (False, True or
      ``"rows"``, ``"flat"``, or a ``PackingOptions``) with ``max_length``, ``max_segments``,
      ``max_tokens``, ``truncate``, ``pack_window``. Once checked, ``packing`` is None or a
      ``PackingOptions`` (``carry=False``) holding them, ``batch_size`` its rows per batch and
      ``pack_window`` set; the four scalar fields are cleared (so checking again is a no-op).
    """

    batch_size: int | None = None
    drop_last: bool = False
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    bucket_boundaries: tuple[int, ...] | str | None = None
    return_attention_mask: bool = True
    shuffle: bool = False
    seed: int | None = None
    world_size: int | None = None
    rank: int | None = None
    uneven: str = "pad"
    columns: tuple[str, ...] | None = None
    label_cols: tuple[str, ...] = ()
    packing: bool | str | PackingOptions | None = False
    max_length: int | None = None
    max_segments: int | None = None
    max_tokens: int | None = None
    truncate: bool = False
    pack_window: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalizing during validation only

    # -- validation, one method per group of fields
    def validate(self) -> None:
        """Check every field (raises ConfigError naming the parameter, its value and what is
        valid), normalizing them: ints, tuples, bools."""
        self.validate_batching()
        self.validate_packing()
        self.validate_padding()
        self.validate_shuffle()
        self.validate_world()
        self.validate_columns()

    def validate_batching(self) -> None:
        if self.batch_size is not None:
            if not _is_int(self.batch_size) or self.batch_size < 1:
                raise ConfigError(f"batch_size={self.batch_size!r}; use an int >= 1 "
                                  "(or None for unbatched records, to_tf_dataset only)")
            self._set("batch_size", int(self.batch_size))
        self._set("drop_last", bool(self.drop_last))

    def validate_packing(self) -> None:
        spec, scalars = self.packing, ("max_length", "max_segments", "max_tokens", "truncate")
        given = [f"{n}={getattr(self, n)!r}" for n in scalars if getattr(self, n) not in (None, False)]
        if spec is None or spec is False:
            if given or self.pack_window is not None:
                what = given[0] if given else f"pack_window={self.pack_window!r}"
                raise ConfigError(f"{what} needs packing=True ('rows', 'flat' or a PackingOptions)")
            self._set("packing", None)
            return
        for name, bad, why in (
            ("bucket_boundaries", self.bucket_boundaries is not None, "packed rows are max_length long"),
            ("pad_to_multiple_of", self.pad_to_multiple_of is not None,
             "packed rows are max_length long (choose max_length a multiple instead)"),
            ("padding_side", self.padding_side != "right", "records are packed from each row's start"),
            ("drop_last", self.drop_last, "every packed batch has the same shape (a window's last one is "
             "filled with empty rows), so there is no short batch to drop (to_tf_dataset: drop_remainder)"),
        ):
            if bad:
                raise ConfigError(f"{name}={getattr(self, name)!r} cannot be used with packing={spec!r}: {why}")
        if isinstance(spec, PackingOptions):
            if given:
                raise ConfigError(f"{given[0]} given beside packing=PackingOptions(...); set it in the PackingOptions")
            if self.batch_size is not None and self.batch_size != spec.batch_rows:
                raise ConfigError(f"batch_size={self.batch_size!r}, but packing={spec!r} makes batches of "
                                  f"{spec.batch_rows} rows; leave batch_size out or make them agree")
            opts = replace(spec, carry=False)
        elif spec is True or (isinstance(spec, str) and spec in LAYOUTS):
            rows, tokens = self.batch_size, self.max_tokens
            if self.max_length is None:
                raise ConfigError(f"packing={spec!r} needs max_length=... (tokens per packed row)")
            if tokens is not None and (not _is_int(tokens) or tokens < 1):
                raise ConfigError(f"max_tokens={tokens!r}; use None or an int >= max_length (tokens per batch)")
            if (rows is None) == (tokens is None):
                raise ConfigError(f"batch_size={rows!r}, max_tokens={tokens!r}: with packing={spec!r} give one, "
                                  "batch_size (rows per batch) or max_tokens (tokens per batch)")
            opts = PackingOptions(
                max_length=self.max_length, rows_per_batch=None if tokens is not None else rows,
                max_tokens=tokens, truncate=bool(self.truncate), layout="rows" if spec is True else spec,
                max_segments=DEFAULT_SEGMENTS if self.max_segments is None else self.max_segments, carry=False,
            )
        else:
            raise ConfigError(f"packing={spec!r}; use False, True, 'rows', 'flat' or a PackingOptions")
        window = PACK_WINDOW if self.pack_window is None else self.pack_window
        if not _is_int(window) or window < 1:
            raise ConfigError(f"pack_window={window!r}; use an int >= 1 (records packed together)")
        for name in scalars:
            self._set(name, False if name == "truncate" else None)
        self._set("packing", opts)
        self._set("batch_size", opts.batch_rows)
        self._set("pack_window", int(window))

    def validate_padding(self) -> None:
        multiple = self.pad_to_multiple_of
        if multiple is not None:
            if not _is_int(multiple) or multiple < 1:
                raise ConfigError(f"pad_to_multiple_of={multiple!r}; use None or an int >= 1")
            self._set("pad_to_multiple_of", int(multiple))
        if self.padding_side not in PADDING_SIDES:
            raise ConfigError(f"padding_side={self.padding_side!r}; use 'right' or 'left'")
        self._set("return_attention_mask", bool(self.return_attention_mask))
        spec = self.bucket_boundaries
        if spec is None:
            return
        if isinstance(spec, str):
            if spec != "auto":
                raise ConfigError(f"bucket_boundaries={spec!r}; use 'auto' or a strictly "
                                  "increasing list of lengths >= 1")
        else:
            try:
                bounds = tuple(spec)
            except TypeError:
                bounds = None
            if (not bounds or not all(_is_int(b) for b in bounds) or bounds[0] < 1
                    or any(a >= b for a, b in zip(bounds, bounds[1:]))):
                raise ConfigError(f"bucket_boundaries={spec!r}; use 'auto' or a strictly "
                                  "increasing list of lengths >= 1")
            self._set("bucket_boundaries", tuple(int(b) for b in bounds))
        if self.batch_size is None:
            raise ConfigError(f"bucket_boundaries={spec!r} needs a batch_size (got None): "
                              "records are grouped into batches by length")

    def validate_shuffle(self) -> None:
        self._set("shuffle", bool(self.shuffle))
        if self.seed is not None:
            if not _is_int(self.seed) or self.seed < 0:
                raise ConfigError(f"seed={self.seed!r}; use None (a random seed) or an int >= 0")
            self._set("seed", int(self.seed))

    def validate_world(self) -> None:
        world, rank = self.world_size, self.rank
        if (world is None) != (rank is None):
            raise ConfigError(f"pass both world_size and rank, or neither (got world_size={world}, "
                              f"rank={rank})")
        if world is not None:
            if not (_is_int(world) and _is_int(rank) and world >= 1 and 0 <= rank < world):
                raise ConfigError(f"rank={rank!r}, world_size={world!r}; need ints with "
                                  "world_size >= 1 and 0 <= rank < world_size")
            self._set("world_size", int(world))
            self._set("rank", int(rank))
        if self.uneven not in UNEVEN:
            raise ConfigError(f"uneven={self.uneven!r}; use 'pad' or 'drop'")

    def validate_columns(self) -> None:
        self._set("columns", _names(self.columns, "columns"))
        self._set("label_cols", _names(self.label_cols, "label_cols") or ())
        if self.label_cols and not self.columns:
            raise ConfigError(f"label_cols={list(self.label_cols)!r} needs columns too (as in HF "
                              "to_tf_dataset); pass columns=[...]")

    # -- derived
    def with_world(self, world_size: int, rank: int) -> LoaderOptions:
        """These options with the world a front end resolved (TF: (1, 0) unless given; PyTorch:
        also ``torch.distributed`` or RANK/WORLD_SIZE), checked again."""
        return replace(self, world_size=world_size, rank=rank)

    def boundaries(self, info: Any, encodings: Mapping[str, ColumnEncoding]) -> list[int] | None:
        """The bucket boundaries of the loaded columns ``encodings``: None, the given ones, or for
        ``"auto"`` ``collate.default_boundaries`` of the first variable-length column."""
        if self.bucket_boundaries is None:
            return None
        variable = [n for n, e in encodings.items() if e.variable]
        if not variable:
            raise ConfigError(f"bucket_boundaries={self.bucket_boundaries!r} needs a variable-length "
                              f"column; the loaded columns {list(encodings)} have none")
        if self.bucket_boundaries == "auto":
            return default_boundaries(info, variable[0], pad_to_multiple_of=self.pad_to_multiple_of)
        return list(self.bucket_boundaries)

    def check_columns(self, info: Any, available: Sequence[str]) -> None:
        """Every selected column exists (``attention_mask`` too when it is made)."""
        wanted = [*(self.columns or ()), *self.label_cols]
        unknown = [c for c in wanted if c not in info.columns and c != MASK_COLUMN]
        if unknown:
            mask = f", {MASK_COLUMN}" if self.return_attention_mask else ""
            raise ConfigError(f"columns {unknown} are not in {info.root}; columns: "
                              f"{', '.join(available)}{mask}")


@dataclass(frozen=True)
class ShuffleConfig:
    """A dataset's shuffle state (``ShardDataset.shuffle_config``), what the epoch plan needs.

    ``shuffled``; ``seed``: the seed in use (drawn at random when none was given, so a
    checkpoint can replay it; None when not shuffled); ``seed_given``: whether a caller chose
    it (several ranks must agree on it); ``buffer_size``: records per shuffle window;
    ``block_records``: records per block of the global shuffle (None unshuffled, or where
    shards are read whole); ``epoch``: the epoch the next iteration plays (``set_epoch``).
    """

    shuffled: bool
    seed: int | None
    seed_given: bool
    buffer_size: int
    block_records: int | None
    epoch: int

    @property
    def plan_seed(self) -> int:
        """The seed the epoch plan is computed with (0 when not shuffled)."""
        return self.seed or 0


def resolve_shuffle(ds: Any, options: LoaderOptions) -> tuple[Any, ShuffleConfig]:
    """(dataset to read, its ShuffleConfig) under a loader's ``shuffle``/``seed``: the one rule of
    both front ends.

    - shuffled if ``options.shuffle`` or ``ds`` is already ``ds.shuffle(...)``-d;
    - ``options.seed`` replaces the dataset's seed; with no seed anywhere a random one is drawn
      (per run, as HF and PyTorch users expect) and recorded in ``ShuffleConfig.seed`` (so in the
      PyTorch ``state_dict``), which replays it; a dataset shuffled without a seed keeps the
      one drawn then, so every loader made from it plays the same order;
    - seeded shuffles give the same batches in both frameworks (the same epoch plan);
    - under several ranks (``options.world_size`` > 1) the seed must have been given (to the
      loader or ``ds.shuffle``): ranks drawing their own would not split one order.
    """
    config = ds.shuffle_config
    newly = options.shuffle and not config.shuffled
    if newly or (config.shuffled and options.seed is not None):  # (re)seeded with options.seed
        ds = ds.shuffle(options.seed, config.buffer_size, block_records=config.block_records)
        config = ds.shuffle_config
    if (options.world_size or 1) > 1 and getattr(ds, "mix_seed_given", True) is False:
        raise ConfigError(f"a weighted mixture across world_size={options.world_size} ranks with seed=None; every "
                          "rank needs the same draws: pass interleave_datasets(..., seed=...)")
    if config.shuffled and (options.world_size or 1) > 1 and not config.seed_given:
        raise ConfigError(f"shuffle across world_size={options.world_size} ranks with seed=None; every "
                          "rank needs the same seed: pass seed=... (or ds.shuffle(seed=...))")
    return ds, config
