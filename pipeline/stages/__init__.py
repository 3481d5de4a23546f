"""The stages: prepare, train, evaluate, export, predict; one entry point `run` each.

`pipeline.cli` calls them in order. No stage imports another: what two stages share is in
the libraries below them (`pipeline.inference`, `pipeline.training`, `pipeline.files`).
"""
