"""Files: reading and writing them, and the formats this project writes.

- `io`: images by their files' axes (TIFF, PNG, OME-Zarr), each input's output NAME,
  atomic all-or-nothing writing, output checks, pixel-size tags.
- `lazy_image`: a tiled TIFF or an OME-Zarr image larger than memory, read box by box.
- `model_file`: a .keras file with the configuration it was trained with inside.
- `rundir`: the run directory: its layout, the run lock, the settings of the run's model.
- `bioimageio`: the BioImage Model Zoo package of an export version.
- `model_source`: the model `--model PATH` names (run, .keras file, export version, zoo
  package), with its settings.

`io` and `lazy_image` are a low layer (the data sets read their images with them);
`model_file`, `rundir`, `bioimageio` and `model_source` carry configurations and so sit above
`pipeline.config.resolve` (docs/architecture.md, "The layers").
"""
