"""Make the student: the source model with most decoder layers dropped, weights copied.

The output directory holds the student (fp32 safetensors), the source's
tokenizer and `student.json` (source identity, kept layers, sizes). If it
already holds this student it is reused; a different one is replaced only with
`overwrite`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import to_dict
from pipeline.errors import MoekdError
from pipeline.files import read_json
from pipeline.models import load_model, load_tokenizer, model_identity, save_model
from pipeline.student_init import drop_layers

REPORT = "student.json"


@dataclass
class Config:
    """Settings of `moekd student`."""

    source: str = "runs/material/model"  # the dense model the teacher was built from
    output: str = "runs/student"
    keep_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 28, 29])
    overwrite: bool = False


def run(config: Config) -> None:
    """Write the student to `config.output`, unless it is already there."""
    source = load_model(config.source, dtype="float32", device="cpu")
    wanted = {"source": model_identity(config.source, source), "keep_layers": list(config.keep_layers)}
    output = Path(config.output)
    if output.exists():
        if (output / REPORT).is_file() and {k: read_json(output / REPORT).get(k) for k in wanted} == wanted:
            print(f"student: {output} already holds this student; nothing to do")
            return
        if not config.overwrite:
            raise MoekdError(f"{output} already holds something else than this student; use --overwrite or another output")
    student = drop_layers(source, config.keep_layers)
    report = {
        **wanted,
        "config": to_dict(config),
        "parameters": sum(p.numel() for p in student.parameters()),
        "source_parameters": sum(p.numel() for p in source.parameters()),
    }
    # An existing output is replaced only once the new student is saved: a failure keeps the old one.
    save_model(output, student, load_tokenizer(config.source), {REPORT: report}, replace=True)
    print(
        f"student: layers {config.keep_layers} of {source.config.num_hidden_layers}, "
        f"{report['parameters'] / 1e6:.1f}M parameters (source {report['source_parameters'] / 1e6:.1f}M) -> {output}"
    )
