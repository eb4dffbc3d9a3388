"""A model's own responses to prepared prompts (on-policy data): the backends `moekd generate` runs.

A `Responder` is a `models.backend.Backend` whose work method is `respond`:
(prompt ids, seq_id, sample) requests in, response ids out, each ending with
the stop token where the model stopped (the student learns to stop too) and
cut at `max_new_tokens` where it did not. Every request draws from its own
random stream, seeded by (seed, seq_id, sample): a response does not depend on
the batch it lands in, on the other requests, or on a resumed run having
skipped some. Temperature 0 is greedy decoding.

- `TransformersResponder`: the model in this process, left-padded batches of
  like-length prompts decoded with a KV cache (`generation.generate_ids`),
  one torch generator per request;
- `VllmResponder`: the model in a vLLM engine, one request per (row, sample)
  with vLLM's per-request seed. Greedy responses are the transformers ones
  (tested on the CPU build); sampled ones are seeded in vLLM's own way, so
  the two backends draw different (equally distributed) responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.config import to_dict
from pipeline.core.seeding import derive_seed, generator
from pipeline.models.backend import Backend, EngineConfig, start_vllm
from pipeline.models.identity import model_identity
from pipeline.models.loading import load_config, load_model, load_tokenizer, pad_token_id
from pipeline.models.logprobs import config_vocab_size
from pipeline.student.generation import generate_ids, stop_token_ids

Request = tuple[list[int], int, int]  # (prompt ids, seq_id, sample)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How responses are drawn: temperature (0: greedy), nucleus mass, length, and the seed of every draw."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"sampling: temperature must be >= 0 (0: greedy), top_p in (0, 1], max_new_tokens "
                             f"at least 1; got {self.temperature}, {self.top_p}, {self.max_new_tokens}")

    def stream(self, seq_id: int, sample: int) -> int:
        """The seed of one request's draws."""
        return derive_seed("respond", self.seed, seq_id, sample)


class Responder(Backend):
    """A generation backend: `respond` to requests (see the module docstring)."""

    def __init__(self, *, model: str, sampling: Sampling, dtype: torch.dtype, device: torch.device,
                 batch_size: int, engine: EngineConfig):
        config = load_config(model)
        self.model_path, self.sampling, self.dtype, self.device = model, sampling, dtype, device
        self.batch_size, self.engine = batch_size, engine
        self.identity, self.vocab_size = model_identity(model, config), config_vocab_size(config)
        self.tokenizer = load_tokenizer(model)

    def respond(self, requests: list[Request], progress: tqdm | None = None) -> list[list[int]]:
        """Response ids per request, in order; `progress.update(n)` as n more are done."""
        raise NotImplementedError


class TransformersResponder(Responder):
    name = "transformers"

    def start(self) -> None:
        if getattr(self, "model", None) is None:
            self.model = load_model(self.model_path, dtype=self.dtype, device=self.device)
            self.stop_ids = stop_token_ids(self.tokenizer, self.model)

    def settings(self) -> dict:
        return {"name": self.name, "batch_size": self.batch_size}  # batch composition changes float rounding

    def respond(self, requests: list[Request], progress: tqdm | None = None) -> list[list[int]]:
        self.start()
        s = self.sampling
        order = sorted(range(len(requests)), key=lambda i: (len(requests[i][0]), i))
        out: list[list[int]] = [[] for _ in requests]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            generators = None if s.temperature == 0 else [generator(s.stream(*requests[i][1:])) for i in batch]
            ids = generate_ids(self.model, [requests[i][0] for i in batch], self.stop_ids,
                               pad_token_id(self.tokenizer), s.max_new_tokens, s.temperature or 1.0, s.top_p,
                               generators, keep_stop=True)
            for i, response in zip(batch, ids):
                out[i] = response
            if progress is not None:
                progress.update(len(batch))
        return out

    def close(self) -> None:
        self.model = None


class VllmResponder(Responder):
    name = "vllm"
    llm = None

    def settings(self) -> dict:
        return {"name": self.name, **to_dict(self.engine)}  # as the vLLM teacher's

    def start(self) -> None:
        if self.llm is not None:
            return
        engine = self.engine
        options = dict(model=self.model_path, skip_tokenizer_init=True, dtype=str(self.dtype).removeprefix("torch."),
                       enforce_eager=True, seed=self.sampling.seed, tensor_parallel_size=engine.tensor_parallel_size,
                       enable_expert_parallel=engine.enable_expert_parallel,
                       gpu_memory_utilization=engine.gpu_memory_utilization, max_num_seqs=engine.max_num_seqs)
        if engine.max_num_batched_tokens is not None:
            options["max_num_batched_tokens"] = engine.max_num_batched_tokens
        _, self.llm = start_vllm(options)
        self.stop_ids = stop_token_ids(self.tokenizer, GenerationSettings(self.model_path))

    def respond(self, requests: list[Request], progress: tqdm | None = None) -> list[list[int]]:
        import vllm
        from vllm.inputs import TokensPrompt

        self.start()
        s = self.sampling
        params = [vllm.SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                      seed=s.stream(seq_id, sample) >> 32, stop_token_ids=sorted(self.stop_ids),
                                      detokenize=False) for _, seq_id, sample in requests]
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids, _, _ in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if progress is not None:
            progress.update(len(requests))
        return [list(output.outputs[0].token_ids) for output in outputs]

    def close(self) -> None:
        if self.llm is not None:  # now, not at interpreter exit (see `teacher.vllm.VllmTeacher.close`)
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


class GenerationSettings:
    """What `generation.stop_token_ids` reads of a model, from its directory alone (vLLM loads the weights)."""

    def __init__(self, directory: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(Path(directory), local_files_only=True)
        except OSError:  # no generation_config.json: the tokenizer's eos and the chat template's end of turn
            self.generation_config = None


RESPONDERS: dict[str, type[Responder]] = {r.name: r for r in (TransformersResponder, VllmResponder)}


def open_responder(name: str, *, model: str, sampling: Sampling, dtype: torch.dtype, device: torch.device,
                   batch_size: int, engine: EngineConfig) -> Responder:
    """The generation backend `name` for `model` (a local model directory)."""
    return RESPONDERS[name](model=model, sampling=sampling, dtype=dtype, device=device, batch_size=batch_size,
                            engine=engine)
