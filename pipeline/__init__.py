"""moekd's library: seven packages in layers, each importing only itself and the ones below it.

    student    the student side: its loss, the training run, SAR's router step, evaluation, statistics
    teacher    the MoE teacher: routing rules and hooks, capture, stage one's backends, the teachers a run learns from
    embedded   the embedded default: its material (model, task suite) and the models it makes (beside teacher)
    data       prepared rows, batches and their teacher signals, the reader
    cache      the teacher-logit cache: identity, shards, manifest and commit records, storage
    models     loading models, what identifies them, their log-probs, the backend interface
    core       errors, typed configs, files, seeds, processes, the output lifecycle

The stages (`stages/`: one module per command, and the CLI) compose these; nothing here imports them.
docs/design.md maps the house, its seams and its formats; tests/test_layout.py holds it to the order above.
"""
