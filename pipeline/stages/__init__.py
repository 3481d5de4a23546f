"""The stages: prepare, train, evaluate, export, predict, crossval; one entry point `run` each.

`pipeline.cli` calls them in order (for crossval, prepare, train and evaluate in every fold, then crossval's report). No stage imports another: what two stages share is in
the libraries below them (`pipeline.inference`, `pipeline.training`, `pipeline.files`).
"""
