"""Command line: parse arguments, resolve and check the configuration, call the stages."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
import typing
from pathlib import Path

from pipeline import PORTABLE_BACKENDS, __version__
from pipeline.config import resolve as configuration
from pipeline.config.presets import PRESETS
from pipeline.config.schema import STRATEGIES, Config
from pipeline.data import DATASETS
from pipeline.errors import PipelineError
from pipeline.files import rundir
from pipeline.files.rundir import RunDir
from pipeline.metrics import crossval as crossval_report

STAGES = ("prepare", "train", "evaluate", "export", "predict")
CROSSVAL = "crossval"  # prepare, train and evaluate in every fold, then one report (pipeline.stages.crossval)
RUNNERS = ("local", "beam")
CONSOLE = "unet-pipeline"  # the command `pip install` adds (setup.py's console_scripts), and the distribution
DESCRIPTION = "U-Net (Ronneberger et al. 2015): prepare, train, evaluate, export, predict."
EVERY = STAGES + ("all", CROSSVAL)
PORTABLE_STAGES = ("prepare", "train")  # the stages that run without TensorFlow, under KERAS_BACKEND=jax or torch
TRAINING = ("train", "all", CROSSVAL)  # the stages that train, and so take --strategy and --init-from
# `unet-pipeline STAGE`: what each stage does, in the command's --help.
SUBCOMMANDS = {
    "prepare": "cut the data set into the run's prepared train, val and test splits, with weight maps",
    "train": "train the U-Net on the run's prepared data (train/best.keras)",
    "evaluate": "score the run's model, --model's or --prediction's file on a labelled split",
    "export": "publish the run's model: a versioned SavedModel for TF Serving, with its bioimage.io package",
    "predict": "segment images with the run's model or --model's: probabilities, masks, cells, overlays",
    "all": "prepare, train, evaluate, export (into the run) and predict, in order, in a new run directory",
    CROSSVAL: "k-fold cross-validation: prepare, train and evaluate every fold, then one report",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as our one line (`error: ...`, exit 2) instead of the usage text."""

    def error(self, message: str) -> typing.NoReturn:
        raise PipelineError(message)


def parser() -> argparse.ArgumentParser:
    """run_pipeline.py's arguments: `--stage STAGE` (default: all) and every stage's options."""
    p = _Parser(prog="run_pipeline.py", description=DESCRIPTION)
    p.add_argument("--stage", choices=EVERY, default="all",
                   help="stage to run (default: all, in order); crossval: k-fold cross-validation, one report")
    _add_options(p)
    return p


def console_parser() -> argparse.ArgumentParser:
    """The `unet-pipeline` command's arguments: the stage as a subcommand, then that stage's options."""
    p = _Parser(prog=CONSOLE, description=DESCRIPTION,
                epilog=f"`{CONSOLE} STAGE --help` lists a stage's options. `{CONSOLE} STAGE ...` is "
                "`python run_pipeline.py --stage STAGE ...` in a checkout of the project.")
    # Not in run_pipeline.py's parser, where it would make `--ver` (for --verbose) ambiguous.
    p.add_argument("--version", action="version", version=f"{CONSOLE} {__version__}")
    commands = p.add_subparsers(dest="stage", metavar="STAGE", title="stages", required=True)
    for stage, summary in SUBCOMMANDS.items():
        _add_options(commands.add_parser(stage, help=summary, description=summary), stage)
    return p


def _add_options(p: argparse.ArgumentParser, stage: str | None = None) -> None:
    """Adds to `p` the options of `stage`, or with None every option (run_pipeline.py takes each with any
    --stage, and `parse` refuses the combinations that mean nothing); one definition for both commands."""

    def option(*flags: str, stages: tuple[str, ...] = EVERY, **settings: typing.Any) -> None:
        if stage is None or stage in stages:
            p.add_argument(*flags, **settings)

    option("--run-dir", type=Path, help="run directory (default: new runs/<time>-<preset> for prepare/all, "
           "runs/<time>-<preset>-crossval for crossval, else the run that prepare last started here, "
           "recorded in runs/.latest)")
    option("--preset", choices=sorted(PRESETS), help="named configuration (default: cpu)")
    option("--config", type=Path, help="YAML or JSON file of overrides, e.g. a saved config.yaml")
    option("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
           help="override one field, e.g. --set train.epochs=20 (repeatable)")
    option("--dataset", choices=DATASETS, help="data set (default: embedded synthetic)")
    option("--data-dir", help="folder of the data set's files: isbi2012's TIFF stacks, image_folder's "
           "images/ and masks/, ctc2d's NAME.zip or NAME/ (without it, ctc2d downloads the zip once)")
    option("--strategy", stages=TRAINING, choices=STRATEGIES,
           help="train on this machine's devices (default) or on the TF_CONFIG cluster")
    option("--init-from", stages=TRAINING, metavar="PATH", help="train: start from these weights instead of "
           "random ones (fine-tuning): a run directory (its train/best.keras), a .keras file or an exported "
           "bioimage.io package (.zip); sets train.init_from")
    option("--model", stages=("predict", "evaluate", CROSSVAL), dest="models", action="append", type=Path,
           metavar="PATH", help="predict, evaluate: segment with this model instead of the run's: a run directory, "
           "a .keras file, an export version folder or a bioimage.io package (.zip); repeated: their ensemble "
           "(mean probability of cell). predict needs no --run-dir with it, but --input and --output. crossval: "
           "another cross-validation of the same folds (repeatable), whose fold models join --run-dir's "
           "in an ensemble per fold")
    option("-i", "--input", stages=("predict", "all"), type=Path, help="predict: an image, a stack, a folder, "
           "a quoted glob pattern, a .txt list of paths (TIFF/PNG), or an OME-Zarr image")
    option("-o", "--output", stages=("predict", "evaluate", "all"), type=Path, help="predict: output folder "
           "(default: <run-dir>/predictions); evaluate with --prediction or --model: the JSON report to write "
           "(with --model by default <run>/evaluation/models/report.json)")
    option("--prediction", stages=("evaluate",), type=Path, help="evaluate: score this probability-of-cell TIFF "
           "(image or stack) instead of a run's model; needs --ground-truth")
    option("--ground-truth", stages=("evaluate",), type=Path,
           help="evaluate: binary labels for --prediction (255 or 1 = cell)")
    option("--split", stages=("evaluate", "all"), choices=("test", "val"),
           help="evaluate: the labelled split to score (default: test, or val where the test split has no "
           "labels, as ISBI 2012's); another split than the default is written to <run>/evaluation/<split>/")
    option("--runner", stages=("predict",), choices=RUNNERS, default="local",
           help="predict: in this process (default), or as an Apache Beam pipeline, whose options "
           "follow a bare --, e.g. -- --direct_num_workers=2 or -- --runner=FlinkRunner ...")
    option("--overwrite", action="store_true",
           help="replace an existing trained model, prepared data, predictions, export version "
           "or evaluation report")
    option("--verbose", action="store_true",
           help="the libraries' INFO log lines too, e.g. Beam's and its workers' (default: warnings only)")


def run_dir(args: argparse.Namespace) -> RunDir:
    """The run directory the command names, or the default for its stage."""
    return RunDir(args.run_dir) if args.run_dir else _default_run(args)


def resolve(args: argparse.Namespace, run: RunDir) -> Config:
    """The run's checked configuration: saved one or preset, then overrides.

    Nothing is written here: each stage saves the configuration once its own checks have
    passed, so that a refused command leaves the run directory as it was.
    """
    overrides = configuration.read_file(args.config) if args.config else {}
    assignments = configuration.parse_set(args.assignments)
    config = run.saved_config()
    if config is not None:
        if args.preset and args.preset != config.preset:
            raise PipelineError(f"{run.config}: run uses preset {config.preset!r}, not {args.preset!r}; "
                                "use a new --run-dir")
    else:
        dataset = args.dataset or _dataset_of(assignments) or _dataset_of(overrides)
        config = configuration.preset(args.preset or overrides.get("preset", "cpu"), dataset)
    config = configuration.apply_overrides(config, _absolute_paths(overrides), str(args.config))
    data = {k: v for k, v in (("dataset", args.dataset), ("data_dir", args.data_dir)) if v is not None}
    train = {k: v for k, v in (("strategy", args.strategy), ("init_from", args.init_from)) if v is not None}
    config = configuration.apply_overrides(config, _absolute_paths({"data": data, "train": train}), "command line")
    config = configuration.apply_overrides(config, _absolute_paths(assignments), "--set")
    configuration.validate(config)
    return config


# Inputs a run records and reads again in later commands (a resumed cross-validation prepares
# its next fold from data.data_dir), maybe from another working directory.
_INPUT_PATHS = (("data", "data_dir"), ("train", "init_from"))


def _absolute_paths(overrides: dict) -> dict:
    """`overrides` with relative input paths made absolute against the working directory, so that
    the run records the folder this command meant, not a path that means another one elsewhere."""
    result = dict(overrides)
    for section, field in _INPUT_PATHS:
        values = result.get(section)
        if isinstance(values, dict) and isinstance(values.get(field), str) and values[field]:
            result[section] = values | {field: os.path.abspath(values[field])}
    return result


def _dataset_of(overrides: dict) -> str | None:
    data = overrides.get("data")
    return data.get("dataset") if isinstance(data, dict) else None


def _default_run(args: argparse.Namespace) -> RunDir:
    if args.stage in ("all", "prepare", CROSSVAL):
        kind = "-crossval" if args.stage == CROSSVAL else ""
        return RunDir(rundir.RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.preset or 'cpu'}{kind}")
    return rundir.latest()


def run_stage(stage: str, config: Config, run: RunDir, args: argparse.Namespace) -> None:
    if _portable_backend():
        _run_portable_stage(stage, config, run, args)
        return
    # The stages are imported here, not at the top, so that --help and refused commands
    # answer without loading TensorFlow (the one deliberate lazy import of pipeline modules).
    from pipeline.stages import evaluate, export, predict, prepare, train

    if stage == "prepare":
        prepare.run(config, run, overwrite=args.overwrite)
        rundir.mark_latest(run)
    elif stage == "train":
        train.run(config, run, overwrite=args.overwrite)
    elif stage == "evaluate" and args.models:
        with _models(args) as models:
            evaluate.run(config, run, args.split, models, args.output, overwrite=args.overwrite)
    elif stage == "evaluate":
        evaluate.run(config, run, args.split)
    elif stage == "export":
        # `--stage all` keeps its export inside the run: only an explicit `--stage export`
        # publishes a version where a model server may be watching.
        root = run.export_root if args.stage == "all" else Path(config.export.root)
        export.run(config, run, root, overwrite=args.overwrite)
    elif stage == "predict":
        with _models(args) if args.models else contextlib.nullcontext() as models:
            predict.run(config, run, args.input, args.output, overwrite=args.overwrite, runner=args.runner,
                        beam_options=args.beam_options, models=models)


def _portable_backend() -> str | None:
    """Keras' backend where it is one that trains without TensorFlow (`pipeline.PORTABLE_BACKENDS`), else None."""
    backend = os.environ.get("KERAS_BACKEND")
    return backend if backend in PORTABLE_BACKENDS else None


def _check_backend(args: argparse.Namespace) -> None:
    """Refuses, under KERAS_BACKEND=jax or torch, every stage but prepare and train: they need TensorFlow."""
    backend = _portable_backend()
    if backend and (args.stage not in PORTABLE_STAGES or args.prediction or args.ground_truth):
        raise PipelineError(f"KERAS_BACKEND={backend} runs --stage {' and '.join(PORTABLE_STAGES)} only (the others "
                            f"need TensorFlow): run --stage {args.stage} without KERAS_BACKEND")


def _run_portable_stage(stage: str, config: Config, run: RunDir, args: argparse.Namespace) -> None:
    """prepare, or train on Keras' JAX or PyTorch backend (`training.portable`): no TensorFlow imported."""
    from pipeline.stages import prepare  # lazily, as in run_stage
    from pipeline.training import portable

    if stage == "prepare":
        prepare.run(config, run, overwrite=args.overwrite)
        rundir.mark_latest(run)
    else:
        portable.run(config, run, overwrite=args.overwrite)


def _models(args: argparse.Namespace, paths: list[Path] | None = None) -> typing.ContextManager[list]:
    """The models `paths` (by default --model's) name, with the command's --config and --set on their settings."""
    from pipeline.files import model_source  # TensorFlow (the zoo package's module): lazily, as the stages

    return model_source.opened(args.models if paths is None else paths, lambda config: _overrides(args, config))


def _overrides(args: argparse.Namespace, config: Config) -> Config:
    """`config` with the command's --config file and --set assignments."""
    if args.config:
        config = configuration.apply_overrides(config, configuration.read_file(args.config), str(args.config))
    return configuration.apply_overrides(config, configuration.parse_set(args.assignments), "--set")


def predict_with_models(args: argparse.Namespace) -> None:
    """`--stage predict --model M [--model M2 ...] --input IN --output OUT` without --run-dir: no run
    directory is read, created or locked; the settings for the outputs are the first model's."""
    from pipeline.stages import predict  # TensorFlow: lazily, as in run_stage

    with _models(args) as models:
        print(f"== predict ({', '.join(str(source.named) for source in models)})", flush=True)
        predict.run(models[0].config, None, args.input, args.output, overwrite=args.overwrite, runner=args.runner,
                    beam_options=args.beam_options, models=models)


def crossval_ensemble(args: argparse.Namespace, run: RunDir) -> None:
    """`--stage crossval --run-dir CV0 --model CV1 ...`: every fold of CV0 scored by the ensemble of
    the fold's models of CV0, CV1, ..., then the ensemble's report (nothing is trained)."""
    from pipeline.stages import crossval, evaluate  # TensorFlow: lazily, as in run_stage

    members = [RunDir(path) for path in args.models]
    with run.lock(exclusive=True), contextlib.ExitStack() as locks:
        crossval.require_crossvals([run, *members])
        config = crossval.settings(resolve(args, run))
        crossval.check_ensemble(config, run, members, args.overwrite)
        for member in members:
            locks.enter_context(member.lock(exclusive=False))
        for index, (fold_config, fold) in enumerate(crossval.folds(config, run)):
            paths = [fold.root, *(member.fold(index).root for member in members)]
            print(f"== crossval fold {index}: evaluate the ensemble of {len(paths)} models", flush=True)
            with fold.lock(exclusive=False), _models(args, paths) as models:
                evaluate.run(fold_config, fold, models=models, output=run.crossval_ensemble_fold(members, index),
                             overwrite=args.overwrite, selection=crossval.ENSEMBLE_SELECTION)
        print(f"== crossval ensemble report ({run})", flush=True)
        crossval.ensemble_run(config, run, members)


def run_crossval(args: argparse.Namespace, run: RunDir) -> None:
    """`--stage crossval`: prepare, train and evaluate every fold as far as it still needs, then the report.

    Every fold is prepared first, so that data the folds cannot be cut from is refused
    before anything trains; the cross-validation's configuration is saved once they are.
    """
    from pipeline.stages import crossval, evaluate, prepare, train  # TensorFlow: lazily, as in run_stage

    if args.models:
        crossval_ensemble(args, run)
        return
    with run.lock(exclusive=True):
        config = crossval.settings(resolve(args, run))
        crossval.check(config, run, args.overwrite)
        if config.train.init_from:
            from pipeline.training import finetune  # TensorFlow: only for the weights the folds start from

            finetune.check_initial_weights(config)
        folds = [(index, *fold, crossval.remaining(*fold, args.overwrite))
                 for index, fold in enumerate(crossval.folds(config, run))]
        for index, fold_config, fold, stages in folds:
            if "prepare" in stages:
                print(f"== crossval fold {index}: prepare ({fold})", flush=True)
                with fold.lock(exclusive=True):
                    prepare.run(fold_config, fold, overwrite=args.overwrite)
        run.save_config(config)
        for index, fold_config, fold, stages in folds:
            with fold.lock(exclusive=True):
                if "train" in stages:
                    print(f"== crossval fold {index}: train ({fold})", flush=True)
                    train.run(fold_config, fold, overwrite=args.overwrite)
                if "evaluate" in stages:
                    print(f"== crossval fold {index}: evaluate ({fold})", flush=True)
                    evaluate.run(fold_config, fold)
            if not stages:
                print(f"== crossval fold {index}: evaluated already ({fold.report})", flush=True)
        print(f"== crossval report ({run})", flush=True)
        crossval.run(config, run)


def _score_files(args: argparse.Namespace) -> int:
    """`--stage evaluate --prediction P --ground-truth G`: no run directory, no model."""
    if args.stage != "evaluate" or not (args.prediction and args.ground_truth):
        raise PipelineError("--prediction and --ground-truth go together, with --stage evaluate")
    from pipeline.stages import evaluate  # TensorFlow: lazily, as in run_stage

    evaluate.score_files(args.prediction, args.ground_truth, args.output, overwrite=args.overwrite)
    return 0


def parse(argv: list[str], command: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Our arguments as `command` (default: run_pipeline.py's `parser`) reads them, and in
    `beam_options` the Beam pipeline options after a bare `--`.

    Every option a stage's subcommand does not take has its default, as with run_pipeline.py.
    """
    separated = "--" in argv
    cut = argv.index("--") if separated else len(argv)
    args = (command or parser()).parse_args(argv[:cut], namespace=parser().parse_args([]))
    args.beam_options = argv[cut + 1:]
    if separated and (args.runner != "beam" or args.stage != "predict"):
        raise PipelineError("options after -- are Beam pipeline options: they need the predict stage with --runner beam")
    if args.runner == "beam" and args.stage != "predict":
        raise PipelineError("--runner beam runs the predict stage: use it with --stage predict")
    _check_models(args)
    if args.split and (args.stage not in ("evaluate", "all") or args.prediction):
        raise PipelineError("--split chooses what the evaluate stage scores of a run: use it with the evaluate "
                            "stage (or all), without --prediction")
    return args


def _check_models(args: argparse.Namespace) -> None:
    """Refuses --model where it has no meaning, and what it needs beside it."""
    if not args.models:
        return
    if args.stage not in ("predict", "evaluate", CROSSVAL) or args.prediction:
        raise PipelineError("--model names the models of the predict, evaluate or crossval stage")
    if args.stage == CROSSVAL and not args.run_dir:
        raise PipelineError("crossval --model needs --run-dir: the cross-validation whose folds the ensemble scores")
    if args.stage == "predict" and not args.output:
        raise PipelineError("predict --model needs --output: the folder its predictions go to")
    chosen = [flag for flag, value in (("--preset", args.preset), ("--dataset", args.dataset),
                                       ("--data-dir", args.data_dir)) if value]
    if args.stage == "predict" and not args.run_dir and chosen:
        raise PipelineError(f"predict --model takes the settings its models were trained with; {chosen[0]} "
                            "chooses nothing there (--set predict.FIELD=VALUE changes how they predict)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of run_pipeline.py: `--stage STAGE` (default: all) and its options."""
    return _main(sys.argv[1:] if argv is None else list(argv), parser(), str)


def console(argv: list[str] | None = None) -> int:
    """Entry point of the `unet-pipeline` command: `unet-pipeline STAGE [options]`; bare, its help."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = console_parser()
    if not argv:  # a bare command is a question, not an order to train
        command.print_help()
        return 0
    return _main(argv, command, as_subcommands)


def as_subcommands(message: str) -> str:
    """`message` in the `unet-pipeline` command's words: messages name a stage as run_pipeline.py's
    `--stage STAGE`, which that command's users would type as `unet-pipeline STAGE`."""
    return re.sub(r"--stage (\w+)", rf"{CONSOLE} \1", message)


def _main(argv: list[str], command: argparse.ArgumentParser, words: typing.Callable[[str], str]) -> int:
    """Runs the command `argv` asks `command` for; 2 after a one-line `error: ...` on stderr, in the
    command's `words`."""
    try:
        args = parse(argv, command)
        _check_backend(args)
        if args.verbose:
            logging.basicConfig(level=logging.INFO)
        if args.prediction or args.ground_truth:
            return _score_files(args)
        if args.models and args.stage == "predict" and not args.run_dir:
            predict_with_models(args)
            return 0
        run = run_dir(args)
        if args.stage == CROSSVAL:
            run_crossval(args, run)
            return 0
        if run.folds.is_dir():
            raise PipelineError(f"{run}: a cross-validation (--stage crossval), whose folds are runs of their own: "
                                f"--run-dir {run.fold(0)}, ...")
        stages = STAGES if args.stage == "all" else (args.stage,)
        writes = bool({"prepare", "train"} & set(stages))  # else the stages only read the run's model
        with run.lock(exclusive=writes):
            config = resolve(args, run)
            run.check_changes(config, stages, args.overwrite)
            if "export" in stages:
                crossval_report.export_estimate(config)  # a refusal before training, not after it
            if config.train.init_from and stages[0] == "prepare" and "train" in stages:
                from pipeline.training import finetune  # TensorFlow: only for the weights a new run starts from

                finetune.check_initial_weights(config)
            for stage in stages:
                print(f"== {stage} ({run})", flush=True)
                run_stage(stage, config, run, args)
    except PipelineError as error:
        print(f"error: {words(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:  # what no check could foresee (a disk filling up during training)
        named = f"{error.filename}: " if error.filename else ""  # never an empty name before the colon
        print(f"error: {named}{error.strerror or error}", file=sys.stderr)
        return 2
    return 0
