"""Data-parallel TensorFlow over several devices (``MirroredStrategy``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.tf_measure.device import DEVICES_TIMEOUT_S, _check, _deepcal, _split, _tf
from dlpipe.benchmark.tf_measure.pipeline import _result
from dlpipe.benchmark.tf_measure.stages import _dlpipe_dataset
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError, DlpipeError

STEPS_PER_CALL = 8


def measure_devices(cfg: BenchConfig) -> FrameworkResult:
    """``MirroredStrategy`` over the GPUs, else over ``cfg.devices`` logical CPU devices. Logical
    devices must be configured before TensorFlow initializes any, so this runs in a new process."""
    _check(cfg)
    if cfg.devices < 1:
        raise ConfigError(f"devices={cfg.devices!r}; must be >= 1")
    with tempfile.TemporaryDirectory(prefix="dlpipe-tf-devices-") as tmp:
        out = os.path.join(tmp, "result.json")
        code = "import sys; from dlpipe.benchmark.tf_measure.devices import _devices_main; sys.exit(_devices_main(sys.argv[1]))"
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import dlpipe

        root = os.path.dirname(os.path.dirname(os.path.abspath(dlpipe.__file__)))  # the folder above dlpipe/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-c", code, out], input=json.dumps(cfg.to_json()), text=True,
                              capture_output=True, env=env, timeout=DEVICES_TIMEOUT_S)  # fmt: skip
        if not os.path.isfile(out):
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise DlpipeError(f"measure_devices' TensorFlow process failed: {tail[0]}")
        with open(out) as f:
            result = json.load(f)
    if "error" in result:
        raise DlpipeError(f"measure_devices' TensorFlow process: {result['error']}")
    return FrameworkResult.from_json(result)


def _devices_main(out_path: str) -> int:
    """The child process of ``measure_devices``: the config as JSON on stdin, the result to a file."""
    try:
        cfg = BenchConfig.from_json(json.load(sys.stdin))
        result = _run_devices(cfg).to_json()
    except DlpipeError as e:
        result = {"error": str(e)}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def _run_devices(cfg: BenchConfig) -> FrameworkResult:
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and cfg.device.lower() != "cpu":
        if cfg.devices > len(gpus):
            raise ConfigError(f"devices={cfg.devices}, but TensorFlow sees {len(gpus)} GPUs")
        names = [f"/GPU:{i}" for i in range(cfg.devices)]
        strategy = tf.distribute.MirroredStrategy(names)
        what = f"{cfg.devices} GPUs"
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.devices
        )
        names = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(
            names, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        what = f"{cfg.devices} logical CPU devices sharing {len(os.sched_getaffinity(0))} CPUs"
    spec = parse_model_spec(cfg.model)
    sleep = spec.make_sleep_model()
    global_batch = cfg.batch_size * strategy.num_replicas_in_sync
    dataset = _dlpipe_dataset(cfg, batch_size=global_batch).map(
        lambda *e: _split(e if len(e) > 1 else e[0])
    ).repeat()  # epoch after epoch: a call of several steps may cross an epoch's end
    dist = strategy.experimental_distribute_dataset(dataset)
    if spec.kind == "deepcal":
        mod = _deepcal()
        with strategy.scope():
            net = mod.build_tf_model()
            train = mod.tf_train_step(net, tf.keras.optimizers.Adam(1e-3))
    else:
        train = None

    def replica(features, labels):
        tokens = tf.reduce_sum(tf.cast(features[MASK], tf.int64))
        loss = train(features, labels) if train is not None else tf.constant(0.0)
        return tf.cast(tf.shape(labels)[0], tf.int64), tokens, loss

    # several steps per call, as Keras's ``steps_per_execution`` runs them: one call of a
    # MirroredStrategy step costs ~1.5 ms of dispatch on logical CPU devices (measured with
    # constant inputs), which one step per call would pay per batch
    @tf.function
    def steps(iterator, count):
        samples, tokens = tf.constant(0, tf.int64), tf.constant(0, tf.int64)
        for _ in tf.range(count):
            n, k, _ = (strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                       for v in strategy.run(replica, args=next(iterator)))  # fmt: skip
            samples, tokens = samples + n, tokens + k
        return samples, tokens

    out: dict[str, Any] = {"samples_per_s": [], "tokens_per_s": []}
    whole, part = divmod(cfg.steps, STEPS_PER_CALL)
    calls = [STEPS_PER_CALL] * whole + [part] * bool(part)
    for _ in range(cfg.repeats):
        iterator = iter(dist)
        try:
            steps(iterator, tf.constant(max(cfg.warmup, 1), tf.int64))[0].numpy()
        except tf.errors.OutOfRangeError:
            raise ConfigError("the dataset yielded no batches; is this rank's share empty?") from None
        per_step, samples, tokens = [], 0, 0
        start = time.perf_counter()
        for count in calls:
            t0 = time.perf_counter()
            n, k = (v.numpy() for v in steps(iterator, tf.constant(count, tf.int64)))
            for _ in range(count if sleep is not None else 0):
                sleep()
            per_step += [(time.perf_counter() - t0) / count] * count
            samples, tokens = samples + int(n), tokens + int(k)
        wall = time.perf_counter() - start
        out["samples_per_s"].append(samples / wall)
        out["tokens_per_s"].append(tokens / wall)
        out.update(compute_s=per_step)  # waits for input happen inside the calls: not apart
    notes = [f"MirroredStrategy over {what}, model {spec}; global batch {global_batch} "
             f"({cfg.batch_size} per replica), split by experimental_distribute_dataset",
             f"{STEPS_PER_CALL} steps per tf.function call (Keras's steps_per_execution), each "
             "strategy.run of the step on every replica (with no model: a token count per replica, "
             "which still moves each replica's share to its device) and the reduction"]  # fmt: skip
    return _result("dlpipe", out, [], notes)
