"""The student side: the distillation loss (`losses`), the optimizer step (`trainer`), a training run from its
directory to final/ (`run`, `rundir`, `checkpoints`), SAR's router step (`sar`), generation (`generation`),
evaluation (`evaluation`) and the statistics that compare trained students (`statistics`).

May import everything below it: core, models, cache, data and teacher.
"""
