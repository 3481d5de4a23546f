"""Training that scales and survives: replicas, workers, kills, NaNs, mixed precision."""

import dataclasses
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_framework_config  # is_op_determinism_enabled: no public name

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.config.schema import TrainConfig
from pipeline.errors import PipelineError
from pipeline.training import callbacks
from pipeline.training.callbacks import resumed_epoch
from pipeline.training.numpy_tiles import joined
from pipeline.training.model import compiled_model
from pipeline.training.process import (
    configure_process, cpu_precision_problem, emulated_on_cpu, precision_notice, set_determinism)
from pipeline.training.schedule import LearningRate

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "smoke", "--set", "train.steps_per_epoch=4"]


def pipeline_process(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_pipeline.py"), *args],
        cwd=ROOT, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finished(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def kill_after_epochs(process: subprocess.Popen, run_dir: Path, epochs: int) -> None:
    """Kills a training process (SIGKILL) once its backup holds `epochs` finished epochs."""
    record = run_dir / "train" / "backup" / "training_metadata.json"
    deadline = time.time() + 180
    while not (record.exists() and json.loads(record.read_text() or "{}").get("epoch", 0) >= epochs):
        assert process.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared smoke run directory, copied by each test that trains in it."""
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    assert main(["--stage", "prepare", "--run-dir", str(run_dir), *QUICK]) == 0
    return run_dir


def copy_of(prepared: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(prepared, target)
    return target


def weights(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path).get_weights()


@pytest.mark.parametrize("clipnorm", [0.0, 0.01])
def test_gradients_do_not_depend_on_the_number_of_replicas(clipnorm):
    # Logical devices must be configured before TensorFlow starts: a process of its own.
    # Keras clips each replica's gradients before summing them, so clipping agrees with
    # one device where the replicas' gradients agree: there both halves of the batch are
    # the same tiles. The last line printed is how far the clipped step is from the
    # unclipped one, to show that the norm did clip.
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pipeline.config import resolve as configuration
        from pipeline.training.model import compiled_model
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 92, 92, 1)).astype("float32")
        y = rng.integers(0, 2, size=(4, 52, 52)).astype("int32")
        w = rng.uniform(0.5, 10, size=(4, 52, 52)).astype("float32")  # uneven weights per replica
        if {clipnorm}:
            x, y, w = (np.concatenate([a[:2], a[:2]]) for a in (x, y, w))
        results = []
        for devices, clipnorm in ((["/cpu:0"], {clipnorm}), (["/cpu:0", "/cpu:1"], {clipnorm}), (["/cpu:0"], 0.0)):
            config = configuration.apply_overrides(configuration.preset("smoke"), {{"train": {{
                "optimizer": "sgd", "momentum": 0.0, "learning_rate": 0.5, "clipnorm": clipnorm}},
                "model": {{"dropout": 0.0}}}}, "t")
            keras.utils.set_random_seed(0)
            strategy = tf.distribute.MirroredStrategy(devices)
            with strategy.scope():
                model = compiled_model(config)
            model.fit(tf.data.Dataset.from_tensors((x, y, w)), epochs=1, verbose=0, shuffle=False)
            results.append((strategy.num_replicas_in_sync, model.get_weights()))
        (one, a), (two, b), (_, unclipped) = results
        assert (one, two) == (1, 2)
        print(max(float(np.max(np.abs(p - q))) for p, q in zip(a, b)))
        print(max(float(np.max(np.abs(p - q))) for p, q in zip(a, unclipped)))
    """)
    output = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    between_replicas, clipped_away = (float(line) for line in output.stdout.strip().splitlines()[-2:])
    assert between_replicas < 1e-5
    assert (clipped_away > 1e-3) == bool(clipnorm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_workers_train_identical_weights_and_the_chief_writes(prepared, tmp_path):
    run_dir = copy_of(prepared, tmp_path / "run")
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    args = ["--stage", "train", "--strategy", "multi_worker", "--run-dir", str(run_dir), *QUICK,
            "--set", "train.epochs=2"]
    workers = [
        pipeline_process(args, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]
    outputs = [finished(worker) for worker in workers]
    assert "2 replica(s) (multi_worker" in outputs[0]
    chief, other = weights(run_dir / "train" / "last.keras"), weights(run_dir / "train" / "worker-1" / "last.keras")
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    assert (run_dir / "train" / "best.keras").is_file()
    assert len((run_dir / "train" / "history.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert list((run_dir / "logs" / "train").glob("events.out.tfevents.*"))
    assert not (run_dir / "train" / "worker-1" / "best.keras").exists()


def test_killed_training_resumes_and_ends_like_an_uninterrupted_run(prepared, tmp_path):
    # Without drop-out: its random masks are drawn afresh after a resume (Keras does not
    # back up seed-generator states), which changes the weights, not the step count.
    epochs = ["--set", "train.epochs=8", "--set", "model.dropout=0.0"]
    straight = copy_of(prepared, tmp_path / "straight")
    finished(pipeline_process(["--stage", "train", "--run-dir", str(straight), *QUICK, *epochs]))

    killed = copy_of(prepared, tmp_path / "killed")
    args = ["--stage", "train", "--run-dir", str(killed), *QUICK, *epochs]
    process = pipeline_process(args)
    kill_after_epochs(process, killed, 2)
    assert not (killed / "train" / "last.keras").exists()

    output = finished(pipeline_process(args))
    assert "resuming after epoch" in output
    assert logged_epochs(killed) == list(range(8))  # each once, wherever in its epoch the kill came
    timed = json.loads((killed / "train" / "epoch_seconds.json").read_text())["epoch_seconds"]
    assert len(timed) == 8 and all(seconds > 0 for seconds in timed)  # the killed command's epochs too
    for a, b in zip(weights(straight / "train" / "last.keras"), weights(killed / "train" / "last.keras")):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def logged_epochs(run_dir: Path) -> list[int]:
    """The epochs of a run's history.csv, in its order (0-based, as Keras logs them)."""
    return [int(line.split(",")[0]) for line in (run_dir / "train" / "history.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("failing", ["BestModelCheckpoint", "ValidationImages"])
def test_a_full_disk_at_an_epoch_end_resumes_with_every_epoch_logged_once(prepared, tmp_path, capsys, monkeypatch,
                                                                          failing):
    # The disk fills up in a callback of the second epoch that writes before history.csv's
    # row (the best model) or after it (the validation images); the same command again
    # resumes and logs every epoch exactly once.
    failed = []

    class DiskFullOnce(getattr(callbacks, failing)):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1 and not failed:
                failed.append(epoch)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "train"))
            super().on_epoch_end(epoch, logs)

    monkeypatch.setattr(callbacks, failing, DiskFullOnce)
    run_dir = copy_of(prepared, tmp_path / "run")
    args = ["--stage", "train", "--run-dir", str(run_dir), *QUICK, "--set", "train.epochs=4"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {run_dir / 'train'}: No space left on device\n"
    assert main(args) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert logged_epochs(run_dir) == [0, 1, 2, 3]
    assert len(json.loads((run_dir / "train" / "epoch_seconds.json").read_text())["epoch_seconds"]) == 4


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_model(prepared, tmp_path, capsys):
    run_dir = copy_of(prepared, tmp_path / "run")
    args = ["--stage", "train", "--run-dir", str(run_dir), *QUICK, "--set", "train.optimizer=sgd",
            "--set", "train.learning_rate=1e12"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: training diverged: loss is nan at epoch ") and ", step " in error
    assert error.count("\n") == 1


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_softmax_and_loss_in_float32(precision):
    config = configuration.apply_overrides(
        configuration.preset("smoke"), {"train": {"precision": precision}}, "test")
    model = compiled_model(config)
    assert model.get_layer("down0_conv1").compute_dtype == precision.split("_")[1]
    assert model.get_layer("down0_conv1").kernel.dtype == "float32"
    assert model.output.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    if precision == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(0)
    logs = model.train_on_batch(rng.normal(size=(2, 92, 92, 1)).astype("float32"),
                                rng.integers(0, 2, (2, 52, 52)), sample_weight=np.ones((2, 52, 52), "float32"),
                                return_dict=True)
    assert np.isfinite(logs["loss"])


def test_a_mixed_precision_is_emulated_without_its_instructions_and_bfloat16_warned_of_on_amx():
    zen3, zen4, sapphire_rapids = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_bf16"}, {"avx512f", "amx_bf16",
                                                                                       "avx512_fp16"}
    assert emulated_on_cpu("mixed_bfloat16", zen3) and not emulated_on_cpu("mixed_bfloat16", zen4)
    assert emulated_on_cpu("mixed_float16", zen4) and not emulated_on_cpu("mixed_float16", sapphire_rapids)
    assert not emulated_on_cpu("mixed_bfloat16", sapphire_rapids)
    assert not any(emulated_on_cpu("float32", flags) for flags in (zen3, zen4, sapphire_rapids))
    # What training warns of: emulation, and bfloat16 on AMX, where it diverged (results.md).
    assert "emulated" in cpu_precision_problem("mixed_bfloat16", zen3)
    assert cpu_precision_problem("mixed_bfloat16", zen4) is None
    assert "diverged" in cpu_precision_problem("mixed_bfloat16", sapphire_rapids)
    assert cpu_precision_problem("mixed_float16", sapphire_rapids) is None
    assert not any(cpu_precision_problem("float32", flags) for flags in (zen3, zen4, sapphire_rapids))


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's instruction sets from Linux's /proc")
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_training_says_what_this_cpu_makes_of_its_precision(precision, capsys):
    precision_notice(TrainConfig(precision=precision))
    this_cpu = set(Path("/proc/cpuinfo").read_text().split())
    problem = None if tf.config.list_physical_devices("GPU") else cpu_precision_problem(precision, this_cpu)
    assert capsys.readouterr().out == (f"notice: train.precision={precision}: {problem}\n" if problem else "")


@pytest.mark.parametrize("shape,expected", [
    # steps 0..9 of 10, 2 of them warming up: 0.5, 1, then the shape from the peak to 0 at step 10.
    ("constant", [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("cosine", [0.5, 1] + [0.5 * (1 + np.cos(np.pi * k / 8)) for k in range(8)]),
    ("polynomial", [0.5, 1] + [(1 - k / 8) ** 0.9 for k in range(8)]),
])
def test_learning_rate_warms_up_then_follows_its_shape(shape, expected):
    schedule = LearningRate(2e-3, total_steps=10, shape=shape, warmup_steps=2)
    np.testing.assert_allclose([float(schedule(step)) for step in range(10)], np.array(expected) * 2e-3, rtol=1e-5)
    assert LearningRate.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_the_optimizer_follows_the_configured_schedule():
    config = configuration.apply_overrides(configuration.preset("smoke"), {"train": {
        "lr_schedule": "cosine", "epochs": 2, "steps_per_epoch": 5, "learning_rate": 0.01}}, "test")
    model = compiled_model(config)
    model.optimizer.iterations.assign(5)  # half way through 10 steps: half the peak
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 0.005, rtol=1e-5)


def test_the_challenge_metric_chooses_the_best_model(prepared, tmp_path, capsys):
    run_dir = copy_of(prepared, tmp_path / "run")
    args = ["--stage", "train", "--run-dir", str(run_dir), *QUICK, "--set", "train.epochs=2",
            "--set", "train.select_by=val_rand_error"]
    assert main(args) == 0
    history = (run_dir / "train" / "history.csv").read_text().splitlines()
    columns = history[0].split(",")
    rows = [dict(zip(columns, line.split(","))) for line in history[1:]]
    errors = [float(row["val_rand_error"]) for row in rows]
    assert all(0 <= error <= 1 for error in errors) and all("val_warping_error" in row for row in rows)
    record = json.loads((run_dir / "train" / "best.json").read_text())
    assert record == {"val_rand_error": min(errors), "epoch": 1 + int(np.argmin(errors))}
    assert f"best val_rand_error {min(errors):.6g}" in capsys.readouterr().out


def test_xla_is_never_dropped_silently():
    config = configuration.apply_overrides(configuration.preset("smoke"), {"train": {"jit_compile": True}}, "test")
    tf.config.experimental.enable_op_determinism()  # what a run without XLA leaves in the process
    with (pytest.warns(UserWarning, match="Proceeding with `jit_compile=False`"),  # what Keras does: the error says it
          pytest.raises(PipelineError, match="^train.jit_compile=true: Keras cannot compile this model with XLA")):
        compiled_model(config)
    set_determinism(config.train)
    assert compiled_model(config).jit_compile
    set_determinism(configuration.preset("smoke").train)  # as the other tests expect it


def test_joined_splits_pad_the_smaller_images_as_prepare_does():
    first = {"images": np.arange(2 * 3 * 4 * 1).reshape(2, 3, 4, 1), "instances": np.ones((2, 3, 4), np.int32),
             "weights": np.ones((2, 3, 4), np.float32), "sizes": np.array([[3, 4]] * 2)}
    second = {"images": np.zeros((1, 5, 2, 1), np.int64), "instances": np.full((1, 5, 2), 2, np.int32),
              "weights": np.full((1, 5, 2), 3, np.float32), "sizes": np.array([[5, 2]])}
    both = joined(first, second)
    assert {key: value.shape for key, value in both.items()} == {
        "images": (3, 5, 4, 1), "instances": (3, 5, 4), "weights": (3, 5, 4)}
    np.testing.assert_array_equal(both["images"][:2, 3:], first["images"][:, [1, 0]])  # mirrored, not learnt:
    assert not both["weights"][:2, 3:].any() and not both["instances"][:2, 3:].any()  # weight 0, background
    assert not both["weights"][2, :, 2:].any() and (both["weights"][2, :, :2] == 3).all()


@pytest.mark.parametrize("setting, selection", [
    ("train.include_validation=true", "trained on the validation split too"),
    ("train.select_by=last", "train.select_by=last: the last epoch kept"),
])
def test_the_last_epoch_is_kept_when_nothing_held_out_chooses(prepared, tmp_path, capsys, setting, selection):
    run_dir = copy_of(prepared, tmp_path / "run")
    args = ["--stage", "train", "--run-dir", str(run_dir), *QUICK, "--set", "train.epochs=2", "--set", setting]
    assert main(args) == 0
    assert json.loads((run_dir / "train" / "best.json").read_text())["epoch"] == 2
    assert "last epoch val_loss " in capsys.readouterr().out
    for best, last in zip(weights(run_dir / "train" / "best.keras"), weights(run_dir / "train" / "last.keras")):
        np.testing.assert_array_equal(best, last)
    assert main(["--stage", "evaluate", "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert selection in report["model_selection"]


def test_the_selection_rule_chooses_an_epoch_without_changing_the_training(prepared, tmp_path):
    # Scoring the validation split every epoch (the challenge metric's callback) must not
    # move any random stream: a run kept by the last epoch is then the same model as the
    # last epoch of a run kept by validation Rand, so the two can be compared seed by seed.
    trained = {}
    for selection in ("val_rand_error", "last"):
        run_dir = copy_of(prepared, tmp_path / selection)
        args = ["--stage", "train", "--run-dir", str(run_dir), *QUICK, "--set", "train.epochs=2",
                "--set", f"train.select_by={selection}"]
        assert main(args) == 0
        trained[selection] = weights(run_dir / "train" / "last.keras")
    for by_rand, by_last in zip(trained["val_rand_error"], trained["last"]):
        np.testing.assert_array_equal(by_rand, by_last)


@pytest.mark.parametrize("text", ["", '{"epoch": ', "[]"])
def test_a_damaged_backup_record_is_one_line_naming_it(tmp_path, text):
    """Keras writes the backup's record in place, so a full disk can leave it cut short."""
    assert resumed_epoch(tmp_path) == 0
    (tmp_path / "training_metadata.json").write_text(text)
    with pytest.raises(PipelineError, match="training_metadata.json: the backup of the interrupted training is damaged"):
        resumed_epoch(tmp_path)
    (tmp_path / "training_metadata.json").write_text('{"epoch": 3}')
    assert resumed_epoch(tmp_path) == 3


def test_configure_process_seeds_every_generator_and_makes_the_ops_deterministic():
    train = dataclasses.replace(configuration.preset("smoke").train, seed=7)

    def draws() -> tuple:
        return random.random(), np.random.random(), float(tf.random.uniform([])), float(keras.random.uniform([]))

    configure_process(dataclasses.replace(train, jit_compile=True))  # XLA: without op determinism
    first = draws()
    assert not tf_framework_config.is_op_determinism_enabled()
    configure_process(train)
    assert draws() == first and tf_framework_config.is_op_determinism_enabled()
    configure_process(dataclasses.replace(train, seed=8))
    assert draws() != first
