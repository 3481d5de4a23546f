from setuptools import find_packages, setup

# apache-beam 2.72 is the first release whose protobuf, grpcio and numpy ranges admit
# TensorFlow 2.21 and TensorBoard 2.21.
BEAM_SDK = "apache-beam>=2.72"
TFDS_CLI = [BEAM_SDK, "mlcroissant>=1.0.9"]
# Beam's TensorFlow model handler (apache_beam.ml.inference.tensorflow_inference) imports
# tensorflow_hub at start-up but does not install it.
BEAM = [BEAM_SDK, "tensorflow-hub>=0.16"]
# The BioImage Model Zoo's validator and model test, which the tests run on an exported
# package (the export writes the package without it). bioimageio.core 0.11 pins
# bioimageio.spec 0.5.12, whose file serializer calls pydantic's handler with two
# arguments, which pydantic 2.14 (pydantic-core 2.50) refuses: every package is then
# reported invalid. bioimageio.spec 0.5.14 has the fix, but no bioimageio.core takes it yet.
BIOIMAGEIO = ["bioimageio.core>=0.11", "pydantic>=2.10.3,<2.14"]
# ONNX weights in the zoo package (`--stage export`). tf2onnx 1.17 takes protobuf >= 3.20
# and numpy >= 1.23.5, so it installs beside TensorFlow 2.21 without downgrading either;
# onnxruntime runs them (the package's test, bench/bench_onnx.py).
ONNX = ["tf2onnx>=1.17", "onnx>=1.17", "onnxruntime>=1.20"]
# The napari plugin (pipeline/napari_plugin, docs/napari.md): napari 0.5 is the first with npe2
# sample data and thread workers as used there; PyQt6 its Qt (napari 0.9 deprecates PyQt5); pytest-qt
# drives a real viewer in the tests.
NAPARI = ["napari>=0.5", "pyqt6>=6.5"]
# `KERAS_BACKEND=jax --stage train`: training on Keras' JAX backend, where TensorFlow cannot
# go (docs/training.md); its CPU build, for CI's test of that path.
JAX = ["jax[cpu]>=0.6"]

setup(
    name="unet-pipeline",
    version="0.1.0",
    description="U-Net (Ronneberger, Fischer and Brox, 2015) for microscopy segmentation in Keras/TensorFlow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tifffile 2025.5.21
    # Only `pipeline` is installed: the top-level `datasets/` folder must never shadow the
    # popular `datasets` package of the same name.
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    # The warp kernel's source: compiled on first use against the installed TensorFlow.
    package_data={"pipeline.training": ["warp_kernel.cc"], "pipeline.napari_plugin": ["napari.yaml"]},
    install_requires=[
        "tensorflow>=2.21",
        "keras>=3.10",
        "tensorflow-datasets>=4.9.9",
        # tensorflow-datasets needs it for package-style builders but declares it only
        # for Python < 3.9 (tensorflow/datasets#11212).
        "importlib_resources>=6.0",
        "tensorboard>=2.20",
        "tensorflow-serving-api>=2.21",  # PredictionLog protos for the export's warm-up file
        "numpy>=1.26",
        "opencv-python-headless>=4.9",
        "tifffile>=2025.5.21",  # zarr 3 stores: tiled TIFFs read lazily
        "pyyaml>=6.0",
        # Images larger than memory: tiled TIFFs through tifffile's zarr store, OME-Zarr.
        "zarr>=3.0",
    ],
    extras_require={
        # What tensorflow-datasets' own `tfds` command (`tfds build datasets/<name>`) imports
        # at start-up but tensorflow-datasets does not install (see datasets/README.md).
        "tfds-cli": TFDS_CLI,
        # `--stage predict --runner beam`: batch prediction on Apache Beam (docs/user-guide.md).
        "beam": BEAM,
        "onnx": ONNX,
        # The napari plugin's dock widget and sample data (docs/napari.md).
        "napari": NAPARI,
        "jax": JAX,
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "py-ctcmetrics>=1.3", "pytest-qt>=4.4",
                 *TFDS_CLI, *BEAM, *BIOIMAGEIO, *ONNX, *NAPARI, *JAX],
    },
    entry_points={"console_scripts": ["unet-pipeline=pipeline.cli:console"],
                  "napari.manifest": ["unet-pipeline = pipeline.napari_plugin:napari.yaml"]},
)
