"""The run directory: the one owner of its layout, of which run a command picks, and of
what a command may change in it.

    runs/.latest                   path of the run directory that `prepare` last started
    <run>/config.yaml              resolved configuration (different earlier ones kept as config.N.yaml)
    <run>/prepared/*.npz           images, instance labels and weight maps per split, and manifest.json
    <run>/.lock                    the run lock (`RunDir.lock`), an empty file that commands `flock`
    <run>/train/best.keras         the model `train.select_by` chose, with its configuration inside
                                   (`model_file`); best.json (its epoch and value)
    <run>/train/example.npy        an image of the data the model learned from, which export cuts its test tile from
    <run>/train/last.keras         model after the last epoch, history.csv, backup/ while training
    <run>/train/worker-N/          last model and backup of worker N > 0 (multi-worker training)
    <run>/logs/                    TensorBoard event files
    <run>/evaluation/              report.json, panel_NNN.png of the split evaluate scores by default
    <run>/evaluation/<split>/      the same for another split (evaluate --split)
    <run>/evaluation[/<split>]/models/report.json   evaluate --model: other models (an ensemble) on the split
    <run>/predictions/             probability maps, masks and overlays of the test split
    <run>/export/<name>/<version>/ the SavedModel that `--stage all` writes (never saved_models/)
    <run>/folds/fold-N/            a cross-validation's fold N (`--stage crossval`), a run directory itself
    <run>/crossval/                its report.json and report.md over the folds, timing.json
    <run>/crossval/ensemble/A+B/   report.json and report.md of the folds' ensembles with the cross-
                                   validations A and B (crossval --model), fold-N/report.json: fold N

Every stage asks a `RunDir` for its paths; no other module joins path names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import io, model_file

RUNS = Path("runs")
LATEST = RUNS / ".latest"

# What a trained model depends on: once a run has one (or a training in progress), these
# sections may only change by training again from scratch (`--stage train --overwrite`).
TRAINED_SECTIONS = ("data", "weight_map", "model", "augment", "train")
# The largest side of the model's example input (`RunDir.save_example`): what the largest
# presets' tiles (508 px) fit in.
EXAMPLE_SIDE = 512
# What prepared data depends on.
PREPARED_SECTIONS = ("data", "weight_map")


def is_chief() -> bool:
    """Whether this process writes the run's shared files (configuration, checkpoints, logs).

    True unless `TF_CONFIG` makes it a worker other than the chief: the task `chief`, or
    worker 0 when the cluster has no chief.
    """
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    if task.get("type") in (None, "chief"):
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in cluster


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.root.exists() and not self.root.is_dir():
            raise PipelineError(f"{self.root}: run directory is a file, not a folder")

    def __str__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def prepared(self, split: str) -> Path:
        return self.root / "prepared" / f"{split}.npz"

    @property
    def manifest(self) -> Path:
        return self.root / "prepared" / "manifest.json"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def best_model(self) -> Path:
        return self.train / "best.keras"

    def trained_model(self) -> Path:
        """The best model, which the stages that read a model load, or an error saying to train first."""
        return require(self.best_model, "train")

    @property
    def example_input(self) -> Path:
        """An image [H, W, C] of the data the model was trained on (`save_example`), for the export."""
        return self.train / "example.npy"

    def save_example(self, image: np.ndarray) -> None:
        """Records `image` (its centre, at most `EXAMPLE_SIDE` pixels square) as the model's example input."""
        top, left = (max(0, (extent - EXAMPLE_SIDE) // 2) for extent in image.shape[:2])
        with io.atomic_path(self.example_input, overwrite=True) as temporary, open(temporary, "wb") as file:
            np.save(file, image[top:top + EXAMPLE_SIDE, left:left + EXAMPLE_SIDE])

    def example(self) -> np.ndarray | None:
        """The model's example input (`save_example`), or None for a run trained before models had one."""
        return np.load(self.example_input) if self.example_input.exists() else None

    @property
    def best_record(self) -> Path:
        return self.train / "best.json"

    @property
    def history(self) -> Path:
        return self.train / "history.csv"

    @property
    def epoch_times(self) -> Path:
        """The wall time of each finished epoch, kept across resumes (`epoch_seconds`)."""
        return self.train / "epoch_seconds.json"

    def worker(self, task_id: int | None = None) -> Path:
        """train/ for the chief; train/worker-N/ for the last model and backup of worker N.

        Every worker keeps its own backup (they all hold the same weights at each epoch
        end) so that workers sharing a file system never write the same file.
        """
        return self.train if task_id is None else self.train / f"worker-{task_id}"

    def last_model(self, task_id: int | None = None) -> Path:
        return self.worker(task_id) / "last.keras"

    def backup(self, task_id: int | None = None) -> Path:
        return self.worker(task_id) / "backup"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    def evaluation_of(self, split: str | None = None) -> Path:
        """evaluation/ for the split evaluate scores by default; evaluation/<split>/ for another."""
        return self.evaluation if split is None else self.evaluation / split

    @property
    def report(self) -> Path:
        """The default split's evaluation report, which export records."""
        return self.report_of()

    def report_of(self, split: str | None = None) -> Path:
        return self.evaluation_of(split) / "report.json"

    def model_report(self, model_sha256: str | None = None) -> tuple[dict | None, str | None]:
        """(the default split's evaluation report of the best model, None), or (None, why there is
        none): not written yet, or it scored another model (its "model_sha256" is not the best
        model's: trained again since, or a report of before 2026-12-07, which named no model).
        `model_sha256`: the best model's, where the caller has read it already."""
        if not self.report.exists():
            return None, f"{self.report} does not exist"
        report = json.loads(self.report.read_text())
        if report.get("model_sha256") != (model_sha256 or io.sha256(self.best_model)):
            return None, f"{self.report} scored another model than {self.best_model}"
        return report, None

    def models_report_of(self, split: str | None = None) -> Path:
        """Where evaluate --model writes its report by default: beside, never over, the run's own."""
        return self.evaluation_of(split) / "models" / "report.json"

    def panel(self, index: int, split: str | None = None) -> Path:
        return self.evaluation_of(split) / f"panel_{index:03d}.png"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def export_root(self) -> Path:
        return self.root / "export"

    @property
    def folds(self) -> Path:
        return self.root / "folds"

    def fold(self, index: int) -> RunDir:
        """The run directory of a cross-validation's fold `index`."""
        return RunDir(self.folds / f"fold-{index}")

    @property
    def crossval(self) -> Path:
        return self.root / "crossval"

    @property
    def crossval_report(self) -> Path:
        return self.crossval / "report.json"

    @property
    def crossval_summary(self) -> Path:
        return self.crossval / "report.md"

    def crossval_ensemble(self, members: Sequence[RunDir]) -> Path:
        """The folder of the ensemble of this and `members`' fold models, named by the members' folders
        (`seed1+seed2`), so that ensembles of other members sit beside it."""
        return self.crossval / "ensemble" / "+".join(member.root.name for member in members)

    def crossval_ensemble_report(self, members: Sequence[RunDir]) -> Path:
        """The report of each fold scored by the ensemble of this and `members`' fold models."""
        return self.crossval_ensemble(members) / "report.json"

    def crossval_ensemble_summary(self, members: Sequence[RunDir]) -> Path:
        return self.crossval_ensemble(members) / "report.md"

    def crossval_ensemble_fold(self, members: Sequence[RunDir], index: int) -> Path:
        """Fold `index`'s evaluation report by the ensemble (its panels beside it, `report_panels/`)."""
        return self.crossval_ensemble(members) / f"fold-{index}" / "report.json"

    @property
    def crossval_timing(self) -> Path:
        """Seconds each fold has trained, added over the commands that finished training it: what
        cross-validations recorded before each fold timed its epochs (`epoch_seconds`)."""
        return self.crossval / "timing.json"

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Holds the run's advisory lock while a command uses the run.

        Commands that change what the run holds (prepare, train) take it `exclusive`;
        those that read its model (evaluate, export, predict) take it shared, so that they
        run side by side but never while the model or its data are being replaced. A
        command that cannot have it is refused at once, in one line naming the holder (its
        PID and command line, from Linux's /proc/locks). The lock is `flock`'s, which the
        kernel frees when its process ends, so a killed command leaves no stale lock; the
        lock file itself is never written, so a refused command changes no file. In a
        cluster only the chief locks: every worker trains the same run. A refused or failed
        command that created the run directory or its lock file removes them again.
        """
        if not is_chief():
            yield
            return
        created_folders = io.missing_folders(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor, created_file = _open_locked(self.lock_file, exclusive, self)
        try:
            yield
        except BaseException:
            if created_file:
                self.lock_file.unlink(missing_ok=True)
            for folder in reversed(created_folders):
                with contextlib.suppress(OSError):  # the run holds files now: a stage got further
                    folder.rmdir()
            raise
        finally:
            os.close(descriptor)  # frees the lock

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def discard_training(self, task_id: int | None = None) -> None:
        """Removes what a training of this process wrote: its backup and last model, and for the
        chief the best model, its record and the history.

        A training that starts over calls it once its checks have passed, so that until its
        first epoch ends the run holds no model at all rather than the earlier one under
        the new settings.
        """
        shutil.rmtree(self.backup(task_id), ignore_errors=True)
        stale = [self.last_model(task_id)]
        if task_id is None:
            stale += [self.best_model, self.best_record, self.history, self.example_input]
        for path in stale:
            path.unlink(missing_ok=True)

    def model_settings(self, config: Config) -> Config:
        """`config` with the sections the run's best model was trained with, read from the model
        file itself (`model_file`); `config` as it is for a model saved without them, and
        for a run without a model, whose stage then says to train first when it loads it."""
        if not self.best_model.exists():
            return config
        trained = model_file.trained_config(self.best_model)
        if trained is None:
            return config
        return with_trained_sections(config, trained)

    def has_trained_model(self) -> bool:
        """A finished training (best model) or one in progress (backup)."""
        return self.best_model.exists() or self.backup().exists()

    def saved_config(self) -> Config | None:
        return configuration.load(self.config) if self.config.exists() else None

    def save_config(self, config: Config) -> None:
        """Writes config.yaml; a different earlier one is kept as config.N.yaml.

        Stages call it once their checks have passed, so a refused command leaves the
        configuration as it was. In a cluster only the chief writes it.
        """
        if not is_chief():
            return
        if self.config.exists():
            if configuration.load(self.config) == config:
                return
            n = 1
            while self.config.with_name(f"config.{n}.yaml").exists():
                n += 1
            os.replace(self.config, self.config.with_name(f"config.{n}.yaml"))
        configuration.save(config, self.config)

    def check_changes(self, config: Config, stages: tuple[str, ...], overwrite: bool) -> None:
        """Refuses a configuration that contradicts what the run already holds.

        A trained model fixes the sections it was trained with, prepared data those it was
        prepared with, unless the command starts that part over (`train`/`prepare` with
        `--overwrite`).
        """
        saved = self.saved_config()
        starts_over = overwrite and stages[0] in ("prepare", "train")
        if saved is None or starts_over:
            return
        if self.has_trained_model():
            _refuse_changes(saved, config, TRAINED_SECTIONS, f"{self.config}: the run's model was trained with",
                            "train again with --stage train --overwrite, or use a new --run-dir")
        elif self.manifest.exists() and "prepare" not in stages:
            _refuse_changes(saved, config, PREPARED_SECTIONS, f"{self.config}: the run's data was prepared with",
                            "run --stage prepare again")


def _open_locked(path: Path, exclusive: bool, run: RunDir) -> tuple[int, bool]:
    """A descriptor of the lock file holding its lock, and whether this call created the file.

    A file that another command removed between our open and our lock (a refused command
    removing the lock file it created) is opened again, so that two commands never hold
    locks on two different files.
    """
    while True:
        try:
            descriptor, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            try:
                descriptor, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise PipelineError(_busy(path, exclusive, run)) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            return descriptor, created
        os.close(descriptor)


def _busy(path: Path, exclusive: bool, run: RunDir) -> str:
    """Why the lock on `path` cannot be had: who writes the run, or who reads its model."""
    holders = _lock_holders(path)
    writers = [_described(pid) for pid, kind in holders if kind == "WRITE"]
    if exclusive and not writers:
        readers = ", ".join(_described(pid) for pid, _ in holders) or "another command"
        return f"{run}: in use by {readers}, reading its model; run this once it has finished"
    writer = writers[0] if writers else "another command"
    if not exclusive:
        return (f"{run}: in use by {writer}, which is writing it (preparing or training), so the run holds no final "
                "model now; run this once it has finished")
    return f"{run}: in use by {writer}, which is writing it; run this once it has finished, or use another --run-dir"


def _lock_holders(path: Path) -> list[tuple[int, str]]:
    """(PID, "WRITE" or "READ") of the processes of this machine that hold `flock` locks on `path`."""
    info = os.stat(path)
    file_id = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:  # not Linux, or no /proc: the message names no holder
        return []
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; a waiting request has "->" second.
    return [(int(fields[4]), fields[3]) for fields in map(str.split, lines)
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == file_id]


def _described(pid: int) -> str:
    """`PID N (command line)`, the command line shortened to one line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:  # ended meanwhile
        return f"PID {pid}"
    words = [Path(word).name if index < 2 else word for index, word in enumerate(argv)]  # python, its script
    command = " ".join(" ".join(words).split())
    return f"PID {pid} (`{command[:150]}{'...' if len(command) > 150 else ''}`)"


def _refuse_changes(saved: Config, config: Config, sections: tuple[str, ...], what: str, remedy: str) -> None:
    for section in sections:
        before, after = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(config, section))
        for field, value in before.items():
            if after[field] != value:
                raise PipelineError(f"{what} {section}.{field}={value!r}, not {after[field]!r}; {remedy}")


def latest() -> RunDir:
    """The run directory that `prepare` last started (runs/.latest), said aloud."""
    if not LATEST.is_file():
        names = sorted(p.name for p in RUNS.glob("*") if (p / "config.yaml").exists()) if RUNS.is_dir() else []
        listed = f" (runs: {', '.join(names)})" if names else ""
        raise PipelineError(f"{LATEST}: no run prepared from this folder yet; run --stage prepare first "
                            f"or give --run-dir{listed}")
    run = RunDir(Path(LATEST.read_text().strip()))
    if not run.config.exists():
        raise PipelineError(f"{LATEST}: names {run}, which holds no run any more; give --run-dir")
    print(f"using run directory {run} (the last one prepared here; --run-dir picks another)")
    return run


def mark_latest(run: RunDir) -> None:
    """Records `run` as the one later commands without --run-dir use."""
    if is_chief():
        io.atomic_write_text(LATEST, f"{run.root}\n")


def epoch_seconds(path: Path) -> list[float | None]:
    """The seconds of each epoch recorded in `path` (a run's `epoch_times`, written by
    `training.callbacks.EpochTimes`; None for an epoch that was not timed); [] where none were."""
    return json.loads(path.read_text())["epoch_seconds"] if Path(path).exists() else []


def crossval_report_file(path: Path) -> Path:
    """The cross-validation report a path names: the file itself (an ensemble's, say), or a
    cross-validation run directory's `crossval/report.json`; a one-line error where there is none."""
    report = path if path.is_file() else RunDir(path).crossval_report
    if not report.is_file():
        raise PipelineError(f"{path}: no cross-validation report ({report}); run --stage crossval first")
    return report


def with_trained_sections(config: Config, trained: Config) -> Config:
    """`config` with the sections a model was trained with (`TRAINED_SECTIONS`) taken from `trained`."""
    return dataclasses.replace(config, **{section: getattr(trained, section) for section in TRAINED_SECTIONS})


def require(path: Path, stage: str) -> Path:
    """Returns `path`, or says which stage to run first when it is missing."""
    if not Path(path).exists():
        raise PipelineError(f"{path}: not found; run --stage {stage} first for this run directory")
    return Path(path)


def data_settings(config: Config) -> dict:
    """The configuration fields that the prepared data depends on."""
    return {section: dataclasses.asdict(getattr(config, section)) for section in PREPARED_SECTIONS}


def prepared_with(run: RunDir, config: Config) -> bool:
    """Whether the run's prepared data was made with `config`'s data settings.

    A field that the manifest lacks was added to the configuration after the data was
    prepared; it counts at its default, the behaviour from before it existed.
    """
    recorded = json.loads(require(run.manifest, "prepare").read_text())["settings"]
    defaults = data_settings(Config())
    return {section: defaults[section] | recorded.get(section, {}) for section in defaults} == data_settings(config)


def load_split(run: RunDir, split: str, config: Config) -> dict[str, np.ndarray]:
    """Loads a prepared split, refusing data prepared with other data settings."""
    if not prepared_with(run, config):
        raise PipelineError(
            f"{run.manifest}: data was prepared with other data/weight-map "
            "settings than the current configuration; run --stage prepare again"
        )
    with np.load(require(run.prepared(split), "prepare")) as arrays:
        return dict(arrays)
