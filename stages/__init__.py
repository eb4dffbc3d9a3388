"""The stages: one module per `moekd` command, each a `Config` dataclass and `run(config)` composing the library
(`pipeline`); no stage imports another. `cli` is the `moekd` command itself, the one module that knows them all.
"""
