"""Run in the vLLM environment by tests/test_vllm.py: the vLLM backend's records and routing choices, as JSON.

    python tests/vllm_probe.py MODEL PREPARED ROUTING_JSON ENGINE_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys

from pipeline.data.prepared import PreparedData
from pipeline.models.backend import EngineConfig
from pipeline.teacher.capture import Capture
from pipeline.teacher.routing import RoutingConfig
from pipeline.teacher.vllm import VllmTeacher


def main() -> None:
    model, prepared, routing, engine, out = sys.argv[1:6]
    routing = RoutingConfig(**json.loads(routing))
    teacher = VllmTeacher(teacher=model, capture=Capture(routing=routing, top_k=8), dtype="float32",
                          engine=EngineConfig(**json.loads(engine)), record_choices=True)
    examples = PreparedData(prepared).rows(0, 10**9)
    with teacher:  # the engine stops at the end of the block
        teacher.start()
        records = teacher.records(examples)
        choices = teacher.choices()
    json.dump({
        "records": [{"seq_id": r.seq_id, "positions": r.positions.tolist(), "ids": r.topk_ids.tolist(),
                     "logprobs": r.topk_logprobs.tolist()} for r in records],
        "choices": choices,
    }, open(out, "w"))


if __name__ == "__main__":
    main()
