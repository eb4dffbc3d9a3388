"""Generate: a model answers the prompts of a prepared split; its responses become a prepared split (on-policy data).

The model (the student, a training run's final/ or checkpoint, any causal LM
with the data's tokenizer) samples `samples` responses per prompt
(`pipeline.student.responses`: temperature, top-p, max new tokens; each
response seeded by (seed, seq_id, sample)), on the transformers backend or
vLLM's. The output is a prepared directory, the format `moekd cache` and
`moekd train` read: row = prompt + response (the stop token kept where the
model stopped), the response masked in, the source row's references and
source kept. `meta.json` records the generator: the model by content, the
sampling settings, the backend and the source data, so a cache made of it
names what made its data (`CacheIdentity.generator`).

GKD's mix of on-policy and dataset rows is `on_policy` (λ): each prompt is
answered by the model with probability λ (a draw seeded by (seed, seq_id)),
else it keeps the dataset's response, once. `stride`/`offset` take the prompts
whose row index is `offset` modulo `stride` (`moekd rounds` gives each round
its own prompts this way).

Prompts are answered `part_size` at a time; each part is written atomically to
parts/ as it is done, so a killed run resumes at the first missing part, and
since every response is seeded by itself, to the same bytes. data.parquet is
assembled from the parts, meta.json written last; then the parts go. The
settings are recorded in generate.json first: a run with others into the same
output is refused unless `overwrite`; a finished output is reused.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.config import config_hash, to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write_json, read_json, remove_stale_temporaries
from pipeline.core.outputs import FOREIGN, Output, Verdict, judge, recorded_in
from pipeline.core.processes import resolve_device
from pipeline.core.seeding import derive_seed
from pipeline.data.prepared import DATA_FILE, FORMAT, META_FILE, SCHEMA, VERSION, PreparedData, write_prepared_data
from pipeline.models.backend import EngineConfig
from pipeline.models.identity import by_content, check_tokenizer, without_path
from pipeline.models.loading import honours_remote_code, resolve_dtype
from pipeline.student.responses import Responder, Sampling, open_responder

SETTINGS_FILE = "generate.json"  # the identity of what this output holds, written before any part
PARTS = "parts"


@dataclass(kw_only=True)
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    output: str  # the prepared directory to write (the responses)
    model: str  # local directory of the generating model (the student, a run's final/ or checkpoint, ...)
    data: str  # a `moekd prepare` directory: its prompts (and, for on_policy < 1, its responses)
    samples: int = 1  # responses per answered prompt (each one row)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    on_policy: float = 1.0  # GKD's λ: the share of prompts the model answers; the rest keep the dataset's response
    stride: int = 1  # take the prompts whose row index is `offset` modulo `stride`
    offset: int = 0
    seed: int = 0  # every draw: the responses and the on-policy mix
    backend: Literal["transformers", "vllm"] = "transformers"
    engine: EngineConfig = field(default_factory=EngineConfig)  # backend=vllm: the engine's settings
    batch_size: int = 16  # transformers: prompts decoded together
    part_size: int = 256  # prompts per part (what a killed run keeps)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"
    overwrite: bool = False  # replace responses generated with other settings
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        for name in ("samples", "stride", "batch_size", "part_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.offset < self.stride:
            raise ValueError(f"offset must be in [0, stride={self.stride}), got {self.offset}")
        if not 0 <= self.on_policy <= 1:
            raise ValueError(f"on_policy must be in [0, 1] (the share of prompts the model answers), got "
                             f"{self.on_policy}")
        if self.backend == "transformers" and self.engine != EngineConfig():
            raise ValueError("engine settings apply to backend=vllm only")
        self.sampling()  # its own checks

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=self.seed)


@honours_remote_code
def run(config: Config) -> dict:
    """Generate `config.output` from `config.data` (or resume it, or find it done); its meta."""
    data = PreparedData(config.data)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    with open_responder(config.backend, model=config.model, sampling=config.sampling(), dtype=dtype, device=device,
                        batch_size=config.batch_size, engine=config.engine) as responder:
        check_tokenizer("the generating model", config.model, responder.tokenizer, responder.vocab_size,
                        {config.data: (data.tokenizer_fingerprint, None)})
        generator = describe_generator(config, data, responder)
        output = Path(config.output)
        if open_output(output, generator, config.overwrite):
            meta = read_json(output / META_FILE, "generated data meta")
            print(f"generate: {output} is up to date ({meta['rows']} rows); nothing to do")
            return meta
        prompts = [i for i in range(len(data)) if i % config.stride == config.offset]
        if not prompts:
            raise MoekdError(f"{config.data} has {len(data)} rows: none is {config.offset} modulo stride="
                             f"{config.stride}, so there is no prompt to answer")
        parts = [prompts[i : i + config.part_size] for i in range(0, len(prompts), config.part_size)]
        answered = [i for i in prompts if on_policy(config, i)]
        done = [p for p in range(len(parts)) if (output / PARTS / part_name(p)).is_file()]
        print(f"generate: {len(prompts)} prompts, {len(answered)} answered by the model x {config.samples} "
              f"({config.backend}); {len(done)} of {len(parts)} parts already done")
        total = len(answered) * config.samples
        todo = [p for p in range(len(parts)) if p not in done]
        with tqdm(total=total, unit="resp", desc="generate", dynamic_ncols=True) as bar:
            bar.update(sum(config.samples for p in done for i in parts[p] if on_policy(config, i)))
            for p in todo:
                rows = respond(config, data, parts[p], responder, bar)
                write_prepared_data(output / PARTS / part_name(p), iter(rows))
    return finish(output, data, generator, [output / PARTS / part_name(p) for p in range(len(parts))], config)


def on_policy(config: Config, seq_id: int) -> bool:
    """Whether the model answers prompt `seq_id` (GKD's λ, drawn per prompt)."""
    return derive_seed("on_policy", config.seed, seq_id) / 2.0**63 < config.on_policy


def describe_generator(config: Config, data: PreparedData, responder: Responder) -> dict:
    """What made the responses, as meta.json and a cache's identity record it: the model (less its path), the
    sampling, the backend, and the source data."""
    return {"model": without_path(responder.identity), "sampling": asdict(config.sampling()),
            "samples": config.samples, "on_policy": config.on_policy, "stride": config.stride,
            "offset": config.offset, "backend": responder.settings(),
            "dtype": str(responder.dtype).removeprefix("torch."),
            "part_size": config.part_size, "data": data.fingerprint}


def comparable(generator: dict) -> dict:
    """A generator as two are compared: its model by content (a moved or renamed model is the same)."""
    return by_content(generator, "model")


def open_output(output: Path, generator: dict, overwrite: bool) -> bool:
    """Whether `output` already holds these responses, finished; else make it ready to (re)generate: reuse its
    parts if it holds the same generation, refuse another (unless `overwrite`, then clear it)."""
    empty = output.is_dir() and not any(output.iterdir())
    recorded = recorded_in(output, SETTINGS_FILE, unrecorded=None if empty else FOREIGN)
    recorded = by_content(recorded, "model")
    where = Output(output, holds="already holds responses generated with other settings",
                   unrecorded="holds something other than moekd generate's responses")
    verdict = judge(where, recorded, comparable(generator), overwrite)
    if verdict is Verdict.SAME and (output / META_FILE).is_file():
        return True
    if verdict is Verdict.REPLACE:  # only what generate writes: the output may hold more
        shutil.rmtree(output / PARTS, ignore_errors=True)
        (output / DATA_FILE).unlink(missing_ok=True)
    (output / PARTS).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output / PARTS)
    (output / META_FILE).unlink(missing_ok=True)
    atomic_write_json(output / SETTINGS_FILE, generator)
    return False


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def respond(config: Config, data: PreparedData, prompts: list[int], responder: Responder, bar: tqdm) -> list[dict]:
    """The rows of one part: per prompt, `samples` rows of the model's responses, or the dataset's row once."""
    wanted = set(prompts)
    examples = {e.seq_id: e for e in data.rows(prompts[0], prompts[-1] + 1) if e.seq_id in wanted}
    requests = [(examples[i].input_ids[: examples[i].prompt_length].tolist(), i, s)
                for i in prompts if on_policy(config, i) for s in range(config.samples)]
    responses = iter(responder.respond(requests, bar))
    rows = []
    for i in prompts:
        e = examples[i]
        if not on_policy(config, i):
            rows.append({"input_ids": e.input_ids.tolist(), "response_mask": e.response_mask.tolist(),
                         "prompt_length": e.prompt_length, "references": e.references, "source": e.source})
            continue
        prompt = e.input_ids[: e.prompt_length].tolist()
        for _ in range(config.samples):
            response = next(responses)
            rows.append({"input_ids": prompt + response,
                         "response_mask": [False] * len(prompt) + [True] * len(response),
                         "prompt_length": len(prompt), "references": e.references, "source": e.source})
    return rows


def finish(output: Path, data: PreparedData, generator: dict, parts: list[Path], config: Config) -> dict:
    """data.parquet from the parts in order, then meta.json; then the parts go."""
    def rows():
        for path in parts:
            yield from pq.read_table(path, schema=SCHEMA).to_pylist()

    counts = {"rows": 0, "tokens": 0, "response_tokens": 0}

    def counted():
        for row in rows():
            counts["rows"] += 1
            counts["tokens"] += len(row["input_ids"])
            counts["response_tokens"] += len(row["input_ids"]) - row["prompt_length"]
            yield row

    write_prepared_data(output / DATA_FILE, counted())
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": config_hash(comparable(generator)),
            "tokenizer_fingerprint": data.tokenizer_fingerprint, **counts, "generator": generator,
            "config": to_dict(config)}
    atomic_write_json(output / META_FILE, meta)
    shutil.rmtree(output / PARTS)
    print(f"generate: {counts['rows']} rows, {counts['response_tokens']} response tokens -> {output}")
    return meta

