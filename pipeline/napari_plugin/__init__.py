"""The napari plugin (the `napari` extra): segment, correct and fine-tune in the viewer.

`napari.yaml` is its npe2 manifest (setup.py's `napari.manifest` entry point). `segmentation`
reads layers and labels probabilities, `corrections` turns corrected layers into a fine-tuning
run, `model_process` runs the network in a child process (`child`, the only module that
imports TensorFlow: napari's process never does), `samples` are the menu's sample images,
`widget` is the dock widget, a thin Qt layer over them; only `widget` and `samples` import Qt
or napari (docs/napari.md).
"""
