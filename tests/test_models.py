"""The DeepCAL-like models: same architecture, parameters and outputs in both frameworks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dlpipe.errors import ConfigError
from dlpipe.models import VOCAB, bucket_ids, init_weights, parameter_count

SMALL = {"channels": 16, "conv_layers": 3, "hidden": 8}  # a non-default shape, to check it flows


def make_batch(width: int = 12, extra_pad: int = 0, n: int = 6, dtype=np.int64, seed: int = 0):
    """Right-padded rows of code points from many scripts (some past VOCAB), lengths 1..width."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, n)
    lengths[0] = width  # one full row
    ids = rng.integers(32, 70_000, (n, width))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(dtype)
    ids = (ids * mask).astype(dtype)
    ids, mask = np.pad(ids, ((0, 0), (0, extra_pad))), np.pad(mask, ((0, 0), (0, extra_pad)))
    labels = rng.uniform([-90, -180], [90, 180], (n, 2)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": lengths}


def features(b: dict, convert=np.asarray, row: int | None = None) -> dict:
    """The model inputs of ``b``; with ``row``, that row alone cut to its real length."""
    keys = ("input_ids", "attention_mask")
    if row is None:
        return {k: convert(b[k]) for k in keys}
    return {k: convert(b[k][row : row + 1, : b["lengths"][row]]) for k in keys}


def torch_inputs(b: dict, row: int | None = None) -> tuple:
    import torch

    f = features(b, row=row)
    return torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])


def imported_frameworks(statement: str) -> str:
    code = f"import sys; {statement}; print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_models_loads_no_framework():
    assert imported_frameworks("import dlpipe.models") == "[]"
    # the TF module imports TensorFlow only when a function needs it
    assert imported_frameworks("import dlpipe.models.deepcal_tf") == "[]"


@pytest.mark.torch
def test_torch_model_module_loads_only_torch():
    pytest.importorskip("torch")
    assert imported_frameworks("import dlpipe.models.deepcal_torch") == "['torch']"


def test_weights_define_the_architecture():
    w = init_weights(0, 128, **SMALL)
    assert w["embed"].shape == (128, 64)
    assert [w[f"conv{i}_w"].shape for i in (1, 2, 3)] == [(5, 64, 16), (5, 16, 16), (5, 16, 16)]
    assert w["dense_w"].shape == (16, 8) and w["out_w"].shape == (8, 2)
    assert parameter_count(128, **SMALL) == sum(v.size for v in w.values())
    again = init_weights(7)
    assert all(np.array_equal(v, again[k]) for k, v in init_weights(7).items())


def test_bucket_ids_is_code_point_mod_vocab():
    got = bucket_ids(np.array([0, 65, VOCAB, VOCAB + 65, 0x4E2D]))
    assert got.tolist() == [0, 65, 0, 65, 0x4E2D % VOCAB]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kernel": 4}, "kernel=4"), ({"channels": 0}, "channels=0"), ({"hidden": 0}, "hidden=0")],
)
def test_init_weights_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        init_weights(0, **kwargs)


@pytest.mark.torch
def test_torch_rejects_weights_for_another_vocab():
    pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch

    with pytest.raises(ConfigError, match="vocab=4096"):
        DeepCalTorch(weights=init_weights(0, 128))


@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.parametrize(("vocab", "sizes"), [(VOCAB, {}), (128, SMALL)], ids=["default", "small"])
def test_tf_and_torch_have_equal_parameters_and_outputs(vocab, sizes):
    pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_tf import build_tf_model
    from dlpipe.models.deepcal_torch import DeepCalTorch

    w = init_weights(3, vocab, **sizes)
    tf_model, torch_model = build_tf_model(vocab, weights=w), DeepCalTorch(vocab, weights=w)
    expected = parameter_count(vocab, **sizes)
    assert tf_model.count_params() == expected
    assert sum(p.numel() for p in torch_model.parameters()) == expected
    for dtype in (np.int64, np.int32):
        b = make_batch(dtype=dtype)
        with torch.no_grad():
            got_torch = torch_model(*torch_inputs(b)).numpy()
        np.testing.assert_allclose(tf_model(features(b)).numpy(), got_torch, atol=1e-4)


@pytest.mark.tf
@pytest.mark.torch
def test_trained_weights_copy_between_frameworks():
    pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_tf import build_tf_model, weights_from_tf
    from dlpipe.models.deepcal_torch import DeepCalTorch, torch_train_step, weights_from_torch

    b = make_batch()
    torch_model = DeepCalTorch(seed=1)
    opt = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
    tensors = {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels")}
    for _ in range(3):
        torch_train_step(torch_model, opt, tensors, torch.device("cpu"))
    tf_model = build_tf_model(weights=weights_from_torch(torch_model))
    back = DeepCalTorch(weights=weights_from_tf(tf_model))
    with torch.no_grad():
        want = torch_model(tensors["input_ids"], tensors["attention_mask"]).numpy()
        again = back(tensors["input_ids"], tensors["attention_mask"]).numpy()
    np.testing.assert_allclose(tf_model(features(b)).numpy(), want, atol=1e-4)
    np.testing.assert_array_equal(again, want)


@pytest.mark.tf
@pytest.mark.torch
def test_tf_and_torch_have_equal_gradients():
    # the PyTorch model runs its convolutions channels-last with its own backward
    # (_ConvReluMask): its gradients must still be TF's
    tf = pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_tf import batch_loss as tf_loss
    from dlpipe.models.deepcal_tf import build_tf_model, weights_from_tf
    from dlpipe.models.deepcal_torch import DeepCalTorch, batch_loss, weights_from_torch

    w, b = init_weights(4, 128, **SMALL), make_batch(width=16, extra_pad=3, n=8, seed=5)
    torch_model, tf_model = DeepCalTorch(128, weights=w), build_tf_model(128, weights=w)
    tensors = {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels")}
    batch_loss(torch_model, tensors, torch.device("cpu")).backward()
    with torch.no_grad():  # the gradients in the canonical layouts, as if they were weights
        for p in torch_model.parameters():
            p.copy_(p.grad)
    with tf.GradientTape() as tape:
        loss = tf_loss(tf_model, features(b, tf.constant), tf.constant(b["labels"]))
    grads = tape.gradient(loss, tf_model.trainable_variables)
    for v, g in zip(tf_model.trainable_variables, grads, strict=True):
        v.assign(tf.convert_to_tensor(g))
    got, want = weights_from_torch(torch_model), weights_from_tf(tf_model)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-4, err_msg=k)


@pytest.mark.torch
def test_make_optimizer_is_adam_at_1e_3_fused_on_cpu():
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch, make_optimizer, torch_train_step

    b = make_batch()
    batch = {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels")}
    models = [DeepCalTorch(seed=1), DeepCalTorch(seed=1)]
    opts = [make_optimizer(models[0]), torch.optim.Adam(models[1].parameters(), lr=1e-3)]
    assert isinstance(opts[0], torch.optim.Adam) and opts[0].defaults["lr"] == 1e-3
    assert opts[0].defaults["fused"]
    for model, opt in zip(models, opts):
        for _ in range(5):
            torch_train_step(model, opt, batch, torch.device("cpu"))
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)  # the same update, up to rounding


@pytest.mark.torch
def test_torch_output_ignores_padding():
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch

    model = DeepCalTorch()
    b, wider = make_batch(), make_batch(extra_pad=9)
    with torch.no_grad():
        a, c = model(*torch_inputs(b)), model(*torch_inputs(wider))
        alone = model(*torch_inputs(b, row=1))
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1:2], alone, atol=1e-5, rtol=0)


@pytest.mark.torch
def test_torch_training_reduces_the_loss():
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch, torch_train_step

    model = DeepCalTorch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    b = make_batch()
    batch = {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels")}
    first = torch_train_step(model, opt, batch, torch.device("cpu"))
    assert isinstance(first, torch.Tensor) and not first.requires_grad  # no host sync per step
    for _ in range(28):
        torch_train_step(model, opt, batch, torch.device("cpu"))
    last = torch_train_step(model, opt, batch, torch.device("cpu"), return_float=True)
    assert isinstance(last, float) and last < float(first) * 0.5


@pytest.mark.tf
def test_tf_output_ignores_padding():
    pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import build_tf_model

    model = build_tf_model()
    b, wider = make_batch(), make_batch(extra_pad=9)
    a, c = model(features(b)).numpy(), model(features(wider)).numpy()
    np.testing.assert_allclose(a, c, atol=1e-5)
    np.testing.assert_allclose(a[1:2], model(features(b, row=1)).numpy(), atol=1e-5)


@pytest.mark.tf
def test_tf_train_step_learns_with_one_graph_for_all_widths():
    tf = pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import build_tf_model, tf_train_step

    model = build_tf_model()
    step = tf_train_step(model, tf.keras.optimizers.Adam(1e-2))
    b = make_batch()
    feats, labels = features(b, tf.constant), tf.constant(b["labels"])
    losses = [float(step(feats, labels)) for _ in range(30)]
    assert losses[-1] < losses[0] * 0.5
    traces = []
    for extra in (1, 5, 9):  # the second width relaxes the shape; later widths reuse that graph
        wider = make_batch(extra_pad=extra)
        step(features(wider, tf.constant), labels)
        traces.append(step.experimental_get_tracing_count())
    assert traces[0] == traces[-1]


@pytest.mark.tf
def test_keras_fit_runs_on_a_tf_data_dataset():
    tf = pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import TF_LOSS, build_tf_model

    b = make_batch(n=8)
    model = build_tf_model()
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=TF_LOSS)
    ds = tf.data.Dataset.from_tensor_slices((features(b), b["labels"])).batch(2)
    history = model.fit(ds, epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


# packed input (issue 10): several records per row, one output per record


def packed(b: dict, layout: str = "rows", max_length: int = 16, max_segments: int = 4) -> dict:
    """The records of ``make_batch`` output ``b`` packed into one batch (numpy), with
    ``record`` naming each segment's row of ``b``."""
    from dlpipe.columns import ColumnEncoding
    from dlpipe.loaders.packing import PackingOptions, SequencePacker

    lengths = np.asarray(b["lengths"])
    n = len(lengths)
    splits = np.concatenate([[0], np.cumsum(lengths)])
    real = np.arange(b["input_ids"].shape[1])[None, :] < lengths[:, None]
    cols = {
        "input_ids": (b["input_ids"][real], splits),
        "labels": (b["labels"].ravel(), 2 * np.arange(n + 1)),
        "record": (np.arange(n), np.arange(n + 1)),
    }
    encodings = {
        "input_ids": ColumnEncoding("input_ids", "int64", (None,), "int32"),
        "labels": ColumnEncoding("labels", "float32", (2,), "float32"),
        "record": ColumnEncoding("record", "int64", (1,), "int32"),
    }
    opts = PackingOptions(max_length=max_length, max_segments=max_segments, rows_per_batch=n,
                          layout=layout, carry=False)  # fmt: skip
    (batch,) = SequencePacker(opts, encodings).pack(cols, np.random.default_rng(0))
    return batch


def per_record(batch: dict, outputs: np.ndarray) -> np.ndarray:
    """Packed outputs ([B, S, 2] or [n, 2]) in record order."""
    if "segment_mask" in batch:
        outputs, records = outputs[batch["segment_mask"]], batch["record"][batch["segment_mask"]]
    else:
        records = batch["record"]
    return outputs[np.argsort(records[:, 0])]


def with_empty_record(b: dict) -> dict:
    """``b`` with its last record emptied (no tokens: output from the biases alone)."""
    b = {k: v.copy() for k, v in b.items()}
    b["lengths"][-1] = 0
    b["input_ids"][-1] = 0
    b["attention_mask"][-1] = 0
    return b


def torch_packed_inputs(batch: dict) -> tuple[tuple, dict]:
    import torch

    if "cu_seqlens" in batch:
        return (torch.from_numpy(batch["input_ids"]),), {
            "cu_seqlens": torch.from_numpy(batch["cu_seqlens"])
        }
    segments = batch["segment_mask"].shape[1]
    ids, seg = (torch.from_numpy(batch[k]) for k in ("input_ids", "segment_ids"))
    return (ids,), {"segment_ids": seg, "num_segments": segments}


def tf_packed(model, batch: dict) -> np.ndarray:
    from dlpipe.models.deepcal_tf import flat_outputs, packed_outputs

    if "cu_seqlens" in batch:
        return flat_outputs(model, batch["input_ids"], batch["cu_seqlens"]).numpy()
    segments = batch["segment_mask"].shape[1]
    return packed_outputs(model, batch["input_ids"], batch["segment_ids"], segments).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_torch_packed_outputs_equal_each_record_alone(layout):
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch

    model = DeepCalTorch(128, weights=init_weights(2, 128, **SMALL))
    b = with_empty_record(make_batch(n=14, seed=4))
    batch = packed(b, layout)
    assert layout == "flat" or batch["segment_mask"].sum(1).max() > 1  # rows hold several records
    args, kwargs = torch_packed_inputs(batch)
    with torch.no_grad():
        want = model(*torch_inputs(b)).numpy()
        got = per_record(batch, model(*args, **kwargs).numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.tf
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_tf_packed_outputs_equal_each_record_alone(layout):
    pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import build_tf_model

    model = build_tf_model(128, weights=init_weights(2, 128, **SMALL))
    b = with_empty_record(make_batch(n=14, seed=4))
    batch = packed(b, layout)
    want = model(features(b)).numpy()
    np.testing.assert_allclose(per_record(batch, tf_packed(model, batch)), want, atol=1e-5)


@pytest.mark.tf
@pytest.mark.torch
def test_tf_and_torch_packed_outputs_agree():
    pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_tf import build_tf_model
    from dlpipe.models.deepcal_torch import DeepCalTorch

    w = init_weights(5)
    batch = packed(make_batch(n=20, seed=6), max_length=32, max_segments=8)
    args, kwargs = torch_packed_inputs(batch)
    with torch.no_grad():
        got_torch = DeepCalTorch(weights=w)(*args, **kwargs).numpy()
    np.testing.assert_allclose(tf_packed(build_tf_model(weights=w), batch), got_torch, atol=1e-4)


@pytest.mark.torch
def test_torch_packed_steps_train_on_the_unpacked_loss():
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch, batch_loss, torch_train_step

    cpu = torch.device("cpu")
    b = make_batch(n=16, seed=7)
    padded = {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels")}
    rows, flat = ({k: torch.from_numpy(np.asarray(v)) for k, v in packed(b, lay).items()}
                  for lay in ("rows", "flat"))  # fmt: skip
    model = DeepCalTorch(seed=3)
    with torch.no_grad():
        want = float(batch_loss(model, padded, cpu))
        assert float(batch_loss(model, rows, cpu)) == pytest.approx(want, rel=1e-5)
        assert float(batch_loss(model, flat, cpu)) == pytest.approx(want, rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = torch_train_step(model, opt, rows, cpu, return_float=True)
    for i in range(28):
        torch_train_step(model, opt, rows if i % 2 else flat, cpu)
    assert torch_train_step(model, opt, rows, cpu, return_float=True) < first * 0.5
    with pytest.raises(ConfigError, match="num_segments"):
        model(rows["input_ids"], segment_ids=rows["segment_ids"])


@pytest.mark.tf
def test_tf_packed_steps_train_on_the_unpacked_loss():
    tf = pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import batch_loss, build_tf_model, tf_train_step

    b = make_batch(n=16, seed=7)
    rows, flat = packed(b, "rows"), packed(b, "flat")
    model = build_tf_model(seed=3)
    want = float(batch_loss(model, features(b), b["labels"]))
    assert float(batch_loss(model, rows, rows["labels"])) == pytest.approx(want, rel=1e-5)
    assert float(batch_loss(model, flat, flat["labels"])) == pytest.approx(want, rel=1e-5)
    step = tf_train_step(model, tf.keras.optimizers.Adam(1e-2))
    first = float(step(rows, rows["labels"]))
    for i in range(28):
        batch = rows if i % 2 else flat
        step(batch, batch["labels"])
    assert float(step(rows, rows["labels"])) < first * 0.5


def hand_packed(rows: list[list[int]], width: int, kernel: int, seed: int = 0):
    """Records of the given lengths (0 included) packed by hand, back to back in rows of
    ``width`` ((row, segment) of each in ``at``), the rest padding of a nonzero id that must
    never be read; the same records padded; the flat form; and weights for ``kernel``."""
    rng = np.random.default_rng(seed)
    records = [rng.integers(1, 70_000, n) for row in rows for n in row]
    ids = np.full((len(rows), width), 9999, np.int64)
    seg = np.zeros((len(rows), width), np.int32)
    at = []  # (row, segment) of each record
    it = iter(records)
    for r, row in enumerate(rows):
        start = 0
        for s, n in enumerate(row):
            ids[r, start : start + n], seg[r, start : start + n] = next(it), s + 1
            at.append((r, s))
            start += n
    longest = max(1, *(len(x) for x in records))
    padded_ids = np.zeros((len(records), longest), np.int64)
    padded_mask = np.zeros((len(records), longest), np.int64)
    for i, x in enumerate(records):
        padded_ids[i, : len(x)], padded_mask[i, : len(x)] = x, 1
    flat = np.concatenate(records)[None]
    cu = np.concatenate([[0], np.cumsum([len(x) for x in records])]).astype(np.int32)
    weights = init_weights(4, 128, kernel=kernel, channels=8, hidden=8)
    return {"rows": (ids, seg, at), "padded": (padded_ids, padded_mask), "flat": (flat, cu),
            "weights": weights}  # fmt: skip


# rows with records shorter than kernel // 2, an empty one between others, a full row, an empty row
HAND_ROWS = [[1, 2, 0, 1, 5], [3], [], [2, 2, 2, 2, 4], [0, 12]]


@pytest.mark.torch
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_torch_packed_short_and_empty_records_in_any_kernel(kernel):
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch

    case = hand_packed(HAND_ROWS, 12, kernel)
    model = DeepCalTorch(128, weights=case["weights"])
    (ids, seg, at), (flat, cu) = case["rows"], case["flat"]
    with torch.no_grad():
        want = model(*(torch.from_numpy(a) for a in case["padded"])).numpy()
        seg = torch.from_numpy(seg)
        rows = model(torch.from_numpy(ids), segment_ids=seg, num_segments=6).numpy()
        flat_out = model(torch.from_numpy(flat), cu_seqlens=torch.from_numpy(cu)).numpy()
    np.testing.assert_allclose(np.stack([rows[r, s] for r, s in at]), want, atol=1e-5)
    np.testing.assert_allclose(flat_out, want, atol=1e-5)


@pytest.mark.tf
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_tf_packed_short_and_empty_records_in_any_kernel(kernel):
    pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import build_tf_model, flat_outputs, packed_outputs

    case = hand_packed(HAND_ROWS, 12, kernel)
    model = build_tf_model(128, weights=case["weights"])
    (ids, seg, at), (flat, cu) = case["rows"], case["flat"]
    padded_ids, padded_mask = case["padded"]
    want = model({"input_ids": padded_ids, "attention_mask": padded_mask}).numpy()
    rows = packed_outputs(model, ids, seg, 6).numpy()
    np.testing.assert_allclose(np.stack([rows[r, s] for r, s in at]), want, atol=1e-5)
    np.testing.assert_allclose(flat_outputs(model, flat, cu).numpy(), want, atol=1e-5)


def assert_grads_close(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-4)


@pytest.mark.torch
def test_torch_packed_gradients_equal_the_unpacked_ones():
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch, batch_loss

    cpu = torch.device("cpu")
    b = with_empty_record(make_batch(n=16, seed=8))
    model = DeepCalTorch(seed=2)

    def grads(batch: dict) -> list:
        model.zero_grad(set_to_none=True)
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
        batch_loss(model, tensors, cpu).backward()
        return [p.grad.numpy().copy() for p in model.parameters()]

    want = grads({k: b[k] for k in ("input_ids", "attention_mask", "labels")})
    for layout in ("rows", "flat"):
        assert_grads_close(grads(packed(b, layout)), want)
    empty_rows = {"input_ids": np.zeros((2, 8), np.int64), "segment_ids": np.zeros((2, 8), np.int32),
                  "segment_mask": np.zeros((2, 3), bool), "labels": np.zeros((2, 3, 2), np.float32)}  # fmt: skip
    empty_flat = {"input_ids": np.zeros((1, 0), np.int64), "cu_seqlens": np.zeros(1, np.int32),
                  "labels": np.zeros((0, 2), np.float32)}  # fmt: skip
    for empty in (empty_rows, empty_flat):  # the fill of uneven ranks: loss 0, gradients 0
        assert all(not g.any() for g in grads(empty))


@pytest.mark.tf
def test_tf_packed_gradients_equal_the_unpacked_ones():
    tf = pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import batch_loss, build_tf_model

    b = with_empty_record(make_batch(n=16, seed=8))
    model = build_tf_model(seed=2)

    def grads(feats: dict, labels) -> list:
        with tf.GradientTape() as tape:
            loss = batch_loss(model, feats, labels)
        values = tape.gradient(loss, model.trainable_variables)
        return [tf.convert_to_tensor(g).numpy() for g in values]

    want = grads(features(b, tf.constant), tf.constant(b["labels"]))
    for layout in ("rows", "flat"):
        batch = packed(b, layout)
        assert_grads_close(grads(batch, batch["labels"]), want)
    empty_rows = {"input_ids": tf.zeros([2, 8], tf.int64), "segment_ids": tf.zeros([2, 8], tf.int32),
                  "segment_mask": tf.zeros([2, 3], tf.bool)}  # fmt: skip
    empty_flat = {"input_ids": tf.zeros([1, 0], tf.int64), "cu_seqlens": tf.zeros([1], tf.int32)}
    for empty, labels in ((empty_rows, tf.zeros([2, 3, 2])), (empty_flat, tf.zeros([0, 2]))):
        assert all(not g.any() for g in grads(empty, labels))  # loss 0, gradients 0
