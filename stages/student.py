"""Make the student: the source model cut narrower (FFN neurons, attention heads) and/or shallower.

Width is cut by importance measured on calibration tokens of the training
data (`pipeline.embedded.student_init`): each FFN keeps its `ffn_size` neurons with the
largest mean output, each attention its `heads` heads with the largest mean
output. Depth is cut by keeping `keep_layers`. Width costs a small model far
less than depth: on SmolLM2-135M, all 30 layers with FFNs cut from 1536 to 512
neurons start at a held-out loss of about 5 nats; 6 of the 30 layers, at 21.

The output directory holds the student (fp32 safetensors, a model of the
source's family), the source's tokenizer and `student.json` (source identity,
settings, sizes, the kept neurons and heads). If it already holds this student
it is reused; a different one is replaced only with `overwrite`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import MoekdError
from pipeline.core.files import sha256_file
from pipeline.data.template import calibration_ids
from pipeline.embedded.student_init import check_width, choose_width, importance, make_student, refit_down
from pipeline.models.identity import model_identity
from pipeline.models.loading import built_model, honours_remote_code, load_model, load_tokenizer, save_model

REPORT = "student.json"


@dataclass
class Config:
    """Settings of `moekd student`."""

    source: str = "runs/material/model"  # the dense model the teacher was built from
    output: str = "runs/student"
    keep_layers: list[int] | None = None  # decoder layers kept, in order; null: all
    ffn_size: int | None = None  # FFN neurons kept per layer, by importance; null: all
    heads: int | None = None  # attention heads kept per layer (a multiple of the key/value heads); null: all
    calibration: str | None = None  # instruction records (the prepare input format) to rank neurons and heads on
    ridge: float | None = 0.01  # refit the kept neurons' down projections to the full FFN output; null: copy them
    calibration_tokens: int = 16384
    sequence_length: int = 256
    overwrite: bool = False
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)


@honours_remote_code
def run(config: Config) -> None:
    """Write the student to `config.output`, unless it is already there."""
    source = load_model(config.source, dtype="float32", device="cpu")
    check_width(source.config, config.ffn_size, config.heads)  # before the calibration pass
    width = config.ffn_size is not None or config.heads is not None
    if width and config.calibration is None:
        raise MoekdError("ffn_size and heads rank neurons and heads on calibration data: set calibration "
                         "(instruction records, e.g. the training split's JSONL)")
    wanted = {"source": model_identity(config.source, source), "settings": identity_settings(config, width)}
    output = Path(config.output)
    if built_model(output, REPORT, wanted, config.overwrite, models=("source",), key=None,
                   what="something else than this student"):
        print(f"student: {output} already holds this student; nothing to do")
        return
    tokenizer = load_tokenizer(config.source)
    kept = None
    if width:
        calibration = calibration_ids(Path(config.calibration), tokenizer, config.calibration_tokens,
                                      config.sequence_length)
        scores = importance(source, calibration)
        kept = choose_width(scores, config.ffn_size, config.heads, source.config.num_key_value_heads)
        if config.ffn_size is not None and config.ridge is not None:
            refit_down(source, kept, scores, config.ridge)
    student = make_student(source, config.keep_layers, kept)
    report = {
        **wanted,
        "parameters": sum(p.numel() for p in student.parameters()),
        "source_parameters": sum(p.numel() for p in source.parameters()),
        "kept": {kind: [ids.tolist() for ids in getattr(kept, kind)] for kind in ("neurons", "heads")
                 if kept is not None and getattr(kept, kind) is not None},  # per source layer
    }
    # An existing output is replaced only once the new student is saved: a failure keeps the old one.
    save_model(output, student, tokenizer, {REPORT: report}, replace=True)
    c, s = student.config, source.config
    print(
        f"student: {c.num_hidden_layers} of {s.num_hidden_layers} layers, FFN {c.intermediate_size} of "
        f"{s.intermediate_size} neurons, {c.num_attention_heads} of {s.num_attention_heads} heads: "
        f"{report['parameters'] / 1e6:.1f}M parameters (source {report['source_parameters'] / 1e6:.1f}M) -> {output}"
    )


def identity_settings(config: Config, width: bool) -> dict:
    """The settings that decide the student (calibration, by content, only when width is cut)."""
    settings = {"keep_layers": config.keep_layers, "ffn_size": config.ffn_size, "heads": config.heads}
    if width:
        path = Path(config.calibration)
        settings |= {"calibration_sha256": sha256_file(path) if path.is_file() else None,
                     "calibration_tokens": config.calibration_tokens, "sequence_length": config.sequence_length,
                     "ridge": config.ridge}
    return settings
