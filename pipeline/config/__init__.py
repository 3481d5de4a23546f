"""Configuration: `schema` (the dataclasses, a leaf), `presets`, `resolve` (overrides, files, `validate`).

Empty on purpose: importing `pipeline.config.schema` runs this file first, and a
re-export of `resolve` here would import `pipeline.data`, which imports the schema.
"""
