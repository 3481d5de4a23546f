"""The SavedModel as TF Serving sees it: signatures, layouts, warm-up file, server config."""

import base64
import fcntl
import json
import multiprocessing
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from pipeline.config import resolve as configuration
from pipeline.errors import PipelineError
from pipeline.inference.labelling.instances import cell_instances
from pipeline.inference.segmenter import Segmenter
from pipeline.inference.tiling import fitted_tile
from pipeline.sizes import valid_input_sizes
from pipeline.stages.export import (
    LOCK_FILE, PACKAGE_FILE, PROVENANCE_FILE, WARMUP_FILE, export_model, publication_lock, versions, warmup_requests,
)
from pipeline.training.model import unet


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small untrained net exported with the smoke preset: (model, config, version folder)."""
    root = tmp_path_factory.mktemp("exports")
    config = configuration.apply_overrides(configuration.preset("smoke"), {"export": {"root": str(root)}}, "test")
    keras.utils.set_random_seed(3)
    model = unet(config.model)
    return model, config, export_model(model, config)


def image_of(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype(np.float32)


def test_a_fresh_process_serves_what_the_pipeline_predicts(exported, tmp_path):
    # Two sizes whose tiles differ (92 and 88 px of the smoke preset's predict.tile_size=92):
    # the signature chooses each image's tile in its graph, as `predict` does.
    model, config, version = exported
    images = [image_of((70, 101)), image_of((30, 45), seed=1)]
    tiles = {int(fitted_tile(*image.shape, config.predict.tile_size, config.model.depth)[0]) for image in images}
    assert len(tiles) == 2
    for index, image in enumerate(images):
        np.save(tmp_path / f"image{index}.npy", image)
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        served = tf.saved_model.load({str(version)!r}).signatures["serving_default"]
        for index in range({len(images)}):
            outputs = served(image=tf.constant(np.load({str(tmp_path)!r} + f"/image{{index}}.npy")))
            np.save({str(tmp_path)!r} + f"/probabilities{{index}}.npy", outputs["probabilities"].numpy())
            np.save({str(tmp_path)!r} + f"/mask{{index}}.npy", outputs["mask"].numpy())
        import sys; assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    for index, image in enumerate(images):
        probabilities = np.load(tmp_path / f"probabilities{index}.npy")
        assert probabilities.shape == (*image.shape, 2)
        expected = Segmenter(model, config)(image[..., None])
        np.testing.assert_allclose(probabilities[..., 1], expected, atol=1e-5)
        mask = np.load(tmp_path / f"mask{index}.npy")
        clear = np.abs(expected - config.predict.threshold) > 1e-4
        np.testing.assert_array_equal(mask[clear], np.where(expected[clear] > config.predict.threshold, 255, 0))


def test_every_input_layout_and_dtype_gives_the_same_segmentation(exported):
    _, _, version = exported
    signatures = tf.saved_model.load(str(version)).signatures
    serve = signatures["serving_default"]
    images = np.stack([image_of((40, 52), seed) for seed in (1, 2)]).round()
    reference = np.stack([serve(image=tf.constant(im))["probabilities"].numpy() for im in images])
    assert reference.shape == (2, 40, 52, 2)
    layouts = {"[H, W, C]": (images[0, ..., None], reference[0]), "[B, H, W]": (images, reference),
               "[B, H, W, C]": (images[..., None], reference)}
    for layout, (array, expected) in layouts.items():
        result = serve(image=tf.constant(array))["probabilities"].numpy()
        np.testing.assert_allclose(result, expected, atol=1e-5, err_msg=layout)
    assert serve(image=tf.constant(images[0, ..., None]))["mask"].shape == (40, 52)
    assert serve(image=tf.constant(images))["mask"].shape == (2, 40, 52)
    # Normalisation is per image, so 8-bit and 16-bit versions of an image agree.
    as_uint8 = signatures["segment_uint8"](image=tf.constant(images[0].astype(np.uint8)))["probabilities"]
    as_uint16 = signatures["segment_uint16"](image=tf.constant(images[0].astype(np.uint16) * 257))["probabilities"]
    np.testing.assert_allclose(as_uint8.numpy(), reference[0], atol=1e-5)
    np.testing.assert_allclose(as_uint16.numpy(), reference[0], atol=1e-5)


@pytest.mark.parametrize("shape,message", [
    ((5,), "image must be [H, W], [B, H, W], [H, W, 1] or [B, H, W, 1]"),
    ((2, 20, 20, 2), "image must be"),
    ((1, 2, 20, 20, 1), "image must be"),
])
def test_wrong_rank_or_channels_get_a_clear_error(exported, shape, message):
    serve = tf.saved_model.load(str(exported[2])).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        serve(image=tf.zeros(shape))


def test_nan_input_is_refused(exported):
    serve = tf.saved_model.load(str(exported[2])).signatures["serving_default"]
    image = image_of((30, 30))
    image[3, 4] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="image contains NaN or infinite values"):
        serve(image=tf.constant(image))


def test_saved_model_cli_shows_dynamic_shapes_and_runs_on_an_npy_file(exported, tmp_path):
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run(cli + ["show", "--dir", str(exported[2]), "--all"], check=True, capture_output=True, text=True)
    for signature in ("serving_default", "segment_uint8", "segment_uint16", "tile"):
        assert f"signature_def['{signature}']" in shown.stdout
    default = shown.stdout.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert default.count("shape: unknown_rank") == 3  # image in; mask and probabilities out
    tile = shown.stdout.split("signature_def['tile']")[1].split("signature_def[")[0]
    assert "shape: unknown_rank" in tile and "shape: (-1, 52, 52, 2)" in tile  # any input, checked in the graph
    np.save(tmp_path / "x.npy", image_of((33, 47)))
    subprocess.run(cli + ["run", "--dir", str(exported[2]), "--tag_set", "serve", "--signature_def", "serving_default",
                          "--inputs", f"image={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out")],
                   check=True, capture_output=True)
    mask = np.load(tmp_path / "out" / "mask.npy")
    assert mask.shape == (33, 47) and mask.dtype == np.uint8


def test_rest_request_bodies_decode_into_accepted_inputs(exported):
    serve = tf.saved_model.load(str(exported[2])).signatures["serving_default"]
    images = [image_of((24, 31), seed).round() for seed in (4, 5)]
    # Row format: TF Serving stacks the instances along a new batch axis.
    rows = json.loads(json.dumps({"signature_name": "serving_default", "instances": [im.tolist() for im in images]}))
    batch = tf.constant(np.array(rows["instances"], np.float32))
    # Columnar format: the tensor as sent.
    columns = json.loads(json.dumps({"inputs": {"image": images[1].tolist()}}))
    single = tf.constant(np.array(columns["inputs"]["image"], np.float32))
    np.testing.assert_array_equal(serve(image=batch)["mask"].numpy()[1], serve(image=single)["mask"].numpy())


def test_warmup_requests_parse_and_run_every_signature(exported):
    _, config, version = exported
    signatures = tf.saved_model.load(str(version)).signatures
    records = list(tf.data.TFRecordDataset(str(version / WARMUP_FILE)).as_numpy_iterator())
    assert len(records) == len(warmup_requests(config)) == 7
    seen = set()
    for record in records:
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        assert request.model_spec.name == config.export.name
        [(key, proto)] = request.inputs.items()
        outputs = signatures[request.model_spec.signature_name](**{key: tf.constant(tf.make_ndarray(proto))})
        seen.add(request.model_spec.signature_name)
        assert all(tf.size(value) > 0 for value in outputs.values())
    assert seen == set(signatures)


def test_models_config_lists_the_model_for_the_server(exported):
    _, config, version = exported
    text = (version.parent.parent / "models.config").read_text()
    server_config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    [entry] = server_config.model_config_list.config
    assert (entry.name, entry.base_path, entry.model_platform) == ("unet", "/models/unet", "tensorflow")


def test_the_zoo_package_comes_with_the_version_where_the_server_does_not_look(exported):
    _, config, version = exported
    with zipfile.ZipFile(version / PACKAGE_FILE) as package:
        rdf = yaml.safe_load(package.read("rdf.yaml"))
        assert rdf["weights"]["keras_v3"]["source"] in package.namelist()
    assert rdf["version"] == int(version.name) and rdf["config"]["unet_pipeline"]["version"] == int(version.name)
    assert versions(version.parent) == [int(version.name)]  # the zip is no version of its own


def test_a_package_that_cannot_be_built_leaves_no_version_and_no_scratch(tmp_path):
    config = configuration.apply_overrides(configuration.preset("smoke"), {"export": {"root": str(tmp_path)}}, "test")
    broken = np.full((100, 100, 1), np.nan, np.float32)  # the model's output for it is not finite
    with pytest.raises(PipelineError,
                       match="BioImage Model Zoo package: the model's output for the test input is not finite"):
        export_model(unet(config.model), config, example=broken)
    assert list((tmp_path / config.export.name).iterdir()) == []
    assert not (tmp_path / "models.config").exists()


def test_png_requests_get_the_mask_and_the_cells_as_png(exported):
    model, config, version = exported
    signatures = tf.saved_model.load(str(version)).signatures
    image = image_of((70, 90)).astype(np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    # What TF Serving's REST API makes of {"inputs": {"image_bytes": {"b64": ...}}}.
    sent = base64.b64decode(json.loads(json.dumps({"b64": base64.b64encode(png).decode()}))["b64"])
    outputs = signatures["segment_png"](image_bytes=tf.constant(sent))
    mask = cv2.imdecode(np.frombuffer(outputs["mask_bytes"].numpy(), np.uint8), cv2.IMREAD_UNCHANGED)
    labels = cv2.imdecode(np.frombuffer(outputs["labels_bytes"].numpy(), np.uint8), cv2.IMREAD_UNCHANGED)
    probability = signatures["serving_default"](image=tf.constant(image.astype(np.float32)))["probabilities"][..., 1]
    np.testing.assert_array_equal(mask, np.where(probability.numpy() > config.predict.threshold, 255, 0))
    assert labels.dtype == np.uint16
    expected = cell_instances(probability.numpy(), config.predict.threshold, "components", config.predict.min_size)
    np.testing.assert_array_equal(labels, expected)
    batch = signatures["segment_png"](image_bytes=tf.constant([png, png]))
    assert batch["labels_bytes"].shape == (2,) and batch["labels_bytes"].numpy()[1] == outputs["labels_bytes"].numpy()


def test_a_png_that_is_not_one_gets_an_error(exported):
    serve = tf.saved_model.load(str(exported[2])).signatures["segment_png"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(image_bytes=tf.constant(b"not a png"))


# Every signature meets every bad input in a process apart, as a model server would: an abort
# (oneDNN's, for a tile of the wrong rank) kills the child, and the parent sees it. One child
# for all signatures, loading the model once: a death names its signature and case, and the
# signatures after it count as not reached.
SIGNATURE_CHILD = textwrap.dedent("""
    import json, pickle, sys
    import tensorflow as tf
    version, tables = sys.argv[1], pickle.loads(open(sys.argv[2], "rb").read())
    signatures = tf.saved_model.load(version).signatures
    for name, cases in tables.items():
        signature = signatures[name]
        [key] = signature.structured_input_signature[1]
        for case, value in cases.items():
            value = tf.constant(value)
            print(json.dumps({"signature": name, "case": case}), flush=True)  # so that an abort names it
            try:
                outputs = signature(**{key: value})
                answer = {"answer": {k: v.shape.as_list() for k, v in outputs.items()}}
            except Exception as error:
                answer = {"error": type(error).__name__, "message": str(error)}
            print(json.dumps({"signature": name, "case": case} | answer), flush=True)
""")


def bad_images(dtype: type) -> dict[str, np.ndarray]:
    """Inputs that every whole-image signature of `dtype` must refuse (for a 1-channel model)."""
    shapes = {"a scalar": (), "rank 1": (5,), "rank 5": (1, 2, 20, 20, 1), "2 channels": (2, 20, 20, 2),
              "empty height": (0, 20), "empty width": (20, 0), "empty batch": (0, 20, 20, 1)}
    cases = {name: np.zeros(shape, dtype) for name, shape in shapes.items()}
    cases["colour that is not grey"] = image_of((20, 20, 3), seed=8).astype(dtype)
    cases["another dtype"] = np.zeros((20, 20), np.int32 if dtype == np.float32 else np.float32)
    cases["strings"] = np.array([[b"1", b"2"]], object)
    if dtype == np.float32:
        for name, value in (("NaN", np.nan), ("infinity", np.inf), ("minus infinity", -np.inf)):
            cases[name] = image_of((30, 30))
            cases[name][3, 4] = value
    return cases


def bad_pngs() -> dict[str, np.ndarray]:
    """Inputs that `segment_png` must refuse (for a 1-channel model)."""
    png = cv2.imencode(".png", image_of((30, 30)).astype(np.uint8))[1].tobytes()
    colour = cv2.imencode(".png", image_of((30, 30, 3), seed=9).astype(np.uint8))[1].tobytes()
    return {
        "not a PNG": np.array(b"not a png", object), "no bytes": np.array(b"", object),
        "a truncated PNG": np.array(png[: len(png) // 2], object), "colour that is not grey": np.array(colour, object),
        "a batch with one bad file": np.array([png, b"not a png"], object), "an empty batch": np.array([], object),
        "another dtype": np.zeros((30, 30), np.uint8),
    }


def bad_tiles(tile: int, depth: int) -> dict[str, np.ndarray]:
    """Inputs that the `tile` signature of a 1-channel model exported with `tile`-pixel tiles must refuse."""
    other = valid_input_sizes(depth, tile + 1, tile + 64)[0]  # one the network takes, but not the export's
    shapes = {"one tile without its batch axis": (tile, tile, 1), "a scalar": (), "rank 5": (1, 1, tile, tile, 1),
              "2 channels": (1, tile, tile, 2), "another valid tile size": (1, other, other, 1),
              "an invalid tile size": (1, tile + 1, tile + 1, 1), "not square": (1, tile, other, 1),
              "an empty batch": (0, tile, tile, 1), "an empty tile": (1, 0, 0, 1)}
    cases = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    cases["NaN"] = np.full((1, tile, tile, 1), np.nan, np.float32)
    cases["infinity"] = np.full((2, tile, tile, 1), np.inf, np.float32)
    cases["another dtype"] = np.zeros((1, tile, tile, 1), np.uint8)
    return cases


@pytest.fixture(scope="module")
def refusals(exported, tmp_path_factory) -> tuple[dict[str, dict], subprocess.CompletedProcess]:
    """(signature -> its bad inputs, the child process that fed them all to the exported model)."""
    _, config, version = exported
    folder = tmp_path_factory.mktemp("refusals")
    tables = {"serving_default": bad_images(np.float32), "segment_uint8": bad_images(np.uint8),
              "segment_uint16": bad_images(np.uint16), "segment_png": bad_pngs(),
              "tile": bad_tiles(config.predict.tile_size, config.model.depth)}
    (folder / "tables.pickle").write_bytes(pickle.dumps(tables))
    child = subprocess.run([sys.executable, "-c", SIGNATURE_CHILD, str(version), str(folder / "tables.pickle")],
                           capture_output=True, text=True, timeout=600)
    return tables, child


def records(child: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in child.stdout.splitlines() if line.startswith('{"signature"')]


def finished(child: subprocess.CompletedProcess, signature: str) -> dict[str, dict]:
    """case -> what the child reported of `signature` at its end: {"answer": shapes} or {"error": type, "message": ...}."""
    return {record["case"]: record for record in records(child) if record["signature"] == signature and len(record) > 2}


@pytest.mark.parametrize("signature", ["serving_default", "segment_uint8", "segment_uint16", "segment_png", "tile"])
def test_every_signature_refuses_every_bad_input_without_dying(refusals, signature):
    tables, child = refusals
    cases, outcomes = tables[signature], finished(child, signature)
    if child.returncode != 0 and set(outcomes) != set(cases):
        started = records(child)
        dying = f"{started[-1]['signature']}, {started[-1]['case']!r}" if started else "loading the model"
        cause = signal.Signals(-child.returncode).name if child.returncode < 0 else f"exit {child.returncode}"
        pytest.fail(f"the serving process died ({cause}) on {dying} before {signature} was through: "
                    f"{child.stderr[-1500:]}")
    assert set(outcomes) == set(cases)
    answered = {case: record["answer"] for case, record in outcomes.items() if "answer" in record}
    assert not answered, f"{signature} answered bad inputs"
    assert {record["error"] for record in outcomes.values()} == {"InvalidArgumentError"}


def test_the_tile_signature_names_the_tile_size_it_takes(refusals, exported):
    _, config, _ = exported
    tables, child = refusals
    cases, outcomes = tables["tile"], finished(child, "tile")
    expected = f"tiles must be [N, {config.predict.tile_size}, {config.predict.tile_size}, 1] with N > 0"
    for case in set(cases) - {"NaN", "infinity", "another dtype"}:
        assert expected in outcomes[case]["message"], case
    for case in ("NaN", "infinity"):
        assert "tiles contain NaN or infinite values" in outcomes[case]["message"]


def export_rounds(roots: list[str], name: str, version: int, seed: int, barrier, record: str) -> None:
    """One exporting process: its own model (as from a run of its own), exported into each root
    in turn as soon as every process is ready for it; what it got, target or refusal, to `record`."""
    config = configuration.apply_overrides(configuration.preset("smoke"),
                                           {"export": {"name": name, "version": version}}, "test")
    keras.utils.set_random_seed(seed)
    model = unet(config.model)
    outcomes = []
    for root in roots:
        barrier.wait(timeout=600)
        try:
            outcomes.append(str(export_model(model, config, Path(root), provenance={"writer": seed})))
        except PipelineError as error:
            outcomes.append(f"refused: {error}")
    Path(record).write_text(json.dumps(outcomes))


def exports_at_once(tmp_path: Path, exporters: list[tuple[str, int]], rounds: int) -> tuple[list[Path], list[list]]:
    """Processes started together, one per (name, version) exporter, each exporting into the
    same fresh root each round: (the roots, per round what each exporter got; its seed is its index)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(exporters))
    roots = [tmp_path / f"round{index}" for index in range(rounds)]
    processes = [context.Process(target=export_rounds, args=([str(root) for root in roots], name, version, seed,
                                                             barrier, str(tmp_path / f"exporter{seed}.json")))
                 for seed, (name, version) in enumerate(exporters)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=900)
        assert process.exitcode == 0
    outcomes = [json.loads((tmp_path / f"exporter{seed}.json").read_text()) for seed in range(len(exporters))]
    return roots, [list(got) for got in zip(*outcomes)]


def writer(version: Path) -> int:
    return json.loads((version / PROVENANCE_FILE).read_text())["writer"]


def test_exports_at_once_never_lose_a_version_and_the_server_config_lists_every_model(tmp_path):
    # Two exports of the next version of one model, and two of one explicit version of another.
    roots, rounds = exports_at_once(tmp_path, [("unet", 0), ("unet", 0), ("other", 1), ("other", 1)], rounds=2)
    for root, got in zip(roots, rounds):
        assert sorted(got[:2]) == [str(root / "unet" / "1"), str(root / "unet" / "2")], got
        assert [writer(Path(target)) for target in got[:2]] == [0, 1]  # each version holds its exporter's model
        [published] = [seed for seed in (2, 3) if got[seed] == str(root / "other" / "1")]
        [refusal] = [outcome for outcome in got[2:] if outcome.startswith("refused")]
        assert "export version 1 already exists (pass --overwrite to replace it)" in refusal
        assert writer(root / "other" / "1") == published  # not replaced by the other one
        assert sorted(p.name for p in (root / "unet").iterdir()) == ["1", "2"]  # and no scratch folder left
        assert sorted(p.name for p in (root / "other").iterdir()) == ["1"]
        listed = text_format.Parse((root / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
        assert sorted(entry.name for entry in listed.model_config_list.config) == ["other", "unet"]


def test_the_lock_of_a_killed_export_frees_itself(tmp_path):
    script = ("import sys, time; from pathlib import Path; from pipeline.stages.export import publication_lock\n"
              f"with publication_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with open(tmp_path / LOCK_FILE) as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another export would wait for
    finally:
        holder.kill()
        holder.wait()
    with open(tmp_path / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free at once: nothing to clear by hand
    with publication_lock(tmp_path):
        pass


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_every_folder_and_file_of_a_version_gets_the_mode_the_umask_gives(tmp_path, umask):
    config = configuration.apply_overrides(configuration.preset("smoke"), {"export": {"root": str(tmp_path)}}, "test")
    previous = os.umask(umask)
    try:
        version = export_model(unet(config.model), config, provenance={})
    finally:
        os.umask(previous)
    paths = [version, *version.rglob("*"), tmp_path / "models.config"]
    assert len(paths) > 8
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: {oct(path.stat().st_mode)}"
