"""Stage one's teacher on vLLM (`backend=vllm`): top-k log-probs of prepared rows, any routing mode, engine speed.

A `capture.TeacherBackend`. vLLM is optional: this module imports it only
when the engine starts (`start`). The engine runs the prepared rows as
prompts (one request per row and routing sample, one generated token,
`prompt_logprobs=k` of the raw logits' log-softmax: normalised over the full
vocabulary) and returns the top-k at every position; the records keep those
at the rows' training targets, as the transformers backend does.

Routing is overridden inside the engine, per MoE layer: each router's
`_compute_routing` (every fused-MoE path vLLM takes on CPU, and the plain ones
on GPU, select experts through it) is replaced by one that applies the mode,
with the family's weight rule as the router itself states it (softmax scores,
renormalised or not). Routing is per forward for the whole engine, not per
request, so the override learns which row of the flattened batch is which
(request, position) from the model runner at each forward, and KA draws its
noise for (sequence, sample, layer, position) from `routing.ka_draws`, the
function the transformers backend uses: a cache's KA samples are the same
whichever backend wrote it and however the engine batched or split the work.
Prefix caching is off (KV computed under another routing must not be reused)
and the engine runs eagerly (a compiled graph would not call the override).
The override restates the router's own rule (`RouterRule`: softmax or
sigmoid scores, renormalisation, routed scaling, selection bias; Llama-4's
routing function), as the transformers backend's `RULES` do: KA's sampled
tokens draw from softmax(logits) over every expert, ignoring expert groups,
and the others keep the router's own choice, groups included. A router it
cannot restate (other routing functions or scores, hash-routed layers) or
whose kernel routes internally is refused when the engine starts, naming
it: a probe forward checks that every layer's override ran.

The override lives in the engine's worker processes (one per tensor- or
expert-parallel rank): `WorkerExtension`'s methods, which vLLM mixes into its
worker class, are called by name through `collective_rpc` with plain data
(the routing settings as a dict, rebuilt into a `RoutingConfig` in each
worker). Nothing is pickled on the way, so vLLM's default serialisation (no
`VLLM_ALLOW_INSECURE_SERIALIZATION`) carries it to every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipeline.cache.shards import TeacherRecord
from pipeline.core.config import to_dict
from pipeline.core.errors import MoekdError
from pipeline.data.prepared import target_positions
from pipeline.models.backend import EngineConfig, Progress, no_progress, start_vllm
from pipeline.models.identity import model_identity
from pipeline.models.loading import Placement, load_config
from pipeline.models.logprobs import config_vocab_size
from pipeline.teacher.capture import Capture, TeacherBackend
from pipeline.teacher.families import expert_scores, top_p_experts
from pipeline.teacher.routing import RoutingConfig, ka_draws

# Families whose vLLM forward was not shown to give the transformers teacher's distributions.
MLA = ("vLLM's CPU rotary kernel mis-rotates multi-head latent attention's strided k_pe and multi-head q (measured on "
       "tiny DeepSeek-V3 models in float32: exact agreement with transformers without rope, mean |delta log-prob| "
       "0.024 with it), so its caches cannot be checked against the reference")
UNMATCHED = {"deepseek_v2": MLA, "deepseek_v3": MLA, "deepseek_v32": MLA}


class VllmTeacher(TeacherBackend):
    """The teacher in a vLLM engine, top-k log-probs at the targets; the engine starts at `start`."""

    name = "vllm"

    def __init__(self, *, teacher: str, capture: Capture, dtype: torch.dtype, device: torch.device | None = None,
                 pad_id: int | None = None, routers: str | None = None, engine: EngineConfig | None = None,
                 placement: Placement | None = None, record_choices: bool = False):
        """Read the teacher's config only (the engine loads the weights when it starts). `dtype`: the engine's;
        `device`, `pad_id` and `placement` are the engine's own business (refused: `refusal`);
        `record_choices`: keep every routing decision for `choices` (tests)."""
        config = load_config(teacher)
        self.identity, self.vocab_size = model_identity(teacher, config), config_vocab_size(config)
        self.teacher, self.capture, self.engine = teacher, capture, engine or EngineConfig()
        self.dtype, self.record_choices, self.llm = str(dtype).removeprefix("torch."), record_choices, None
        self.routing, self.k = capture.routing, capture.top_k

    @classmethod
    def refusal(cls, capture: Capture, *, routers: str | None, engine: EngineConfig,
                placement: Placement | None = None) -> str | None:
        if capture.storage == "sampled" or capture.aggregate or routers:
            return ("backend=vllm returns top-k log-probs only: storage=sampled and aggregate=true need the full "
                    "distributions, and routers= the transformers model; use backend=transformers")
        if placement is not None and placement.device_map is not None:
            return ("placement applies to backend=transformers; a vLLM engine spreads the teacher itself "
                    "(engine.tensor_parallel_size, engine.enable_expert_parallel)")
        return None

    def settings(self) -> dict:
        """The engine's settings: part of a vLLM cache's identity."""
        return {"name": self.name, **to_dict(self.engine)}

    def start(self) -> None:
        """Start the engine with the routing override in every worker: vLLM's own checks of its settings, the
        override's refusals and a probe forward, all before anything is written."""
        if self.llm is not None:
            return
        model_type = load_config(self.teacher).model_type
        if model_type in UNMATCHED:
            raise MoekdError(f"backend=vllm does not take model type {model_type!r}: {UNMATCHED[model_type]}; use "
                             "backend=transformers")
        engine, routing, k = self.engine, self.routing, self.k
        if engine.enable_expert_parallel:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                raise MoekdError("engine.enable_expert_parallel: vLLM's CPU build crashes under expert parallelism "
                                 "(a segfault in its fused-MoE kernel, whatever the routing, measured with vLLM "
                                 "0.32); on CPU use engine.tensor_parallel_size alone")
        options = dict(model=self.teacher, skip_tokenizer_init=True, dtype=self.dtype, enforce_eager=True,
                       max_logprobs=k, logprobs_mode="raw_logprobs", enable_prefix_caching=False,
                       tensor_parallel_size=engine.tensor_parallel_size,
                       enable_expert_parallel=engine.enable_expert_parallel,
                       gpu_memory_utilization=engine.gpu_memory_utilization, max_num_seqs=engine.max_num_seqs,
                       seed=routing.seed, worker_extension_cls=f"{__name__}.{WorkerExtension.__name__}")
        if engine.max_num_batched_tokens is not None:
            options["max_num_batched_tokens"] = engine.max_num_batched_tokens
        vllm, self.llm = start_vllm(options)
        self.params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True)
        installed = self.llm.collective_rpc("moekd_install_routing", args=(to_dict(routing), self.record_choices))
        refused = [problem for _, problem in installed if problem]
        if refused:
            raise MoekdError(refused[0])
        self.probe(installed[0][0])

    def close(self) -> None:
        """Stop the engine and its worker processes now. Left to the interpreter's exit, a tensor-parallel
        engine's threads were sometimes torn down while still running and the process aborted (SIGABRT, after
        every shard had been committed)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def probe(self, names: list[str]) -> None:
        """One short forward: every MoE layer's override must have run, in every worker (else its kernel routes
        by itself)."""
        self.generate([([1, 2, 3, 4], 0, 0)])
        calls = zip(*self.llm.collective_rpc("moekd_override_calls"))  # per layer, each worker's count
        missed = [name for name, counts in zip(names, calls) if not all(counts)]
        if missed:
            raise MoekdError(f"vLLM does not select experts through the router moekd overrides in {missed[0]} "
                             f"({len(missed)} of {len(names)} MoE layers): its kernel routes internally, so "
                             f"routing.mode={self.routing.mode} cannot be applied there; use backend=transformers")

    def generate(self, requests: list[tuple[list[int], int, int]]) -> list:
        """Run (input_ids, seq_id, sample) requests; their outputs, in order."""
        from vllm.inputs import TokensPrompt

        base = self.llm.request_counter.counter  # vLLM names request i of this call str(base + i) (+ a suffix)
        table = {str(base + i): (seq_id, sample, len(ids)) for i, (ids, seq_id, sample) in enumerate(requests)}
        self.llm.collective_rpc("moekd_set_requests", args=(table,))
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids, _, _ in requests]
        return self.llm.generate(prompts, self.params, use_tqdm=False)

    def records(self, examples: list, progress: Progress = no_progress) -> list[TeacherRecord]:
        """A TeacherRecord per prepared example: top-k ids and log-probs (M, T, k) at its training targets."""
        self.start()
        num_samples = self.routing.samples
        requests = [(e.input_ids, e.seq_id, m) for e in examples for m in range(num_samples)]
        outputs = self.generate(requests)
        records = []
        for i, example in enumerate(examples):
            positions = target_positions(example.response_mask).astype(np.int32)
            tops = [top_k(outputs[i * num_samples + m].prompt_logprobs, positions, self.k) for m in range(num_samples)]
            records.append(TeacherRecord(
                seq_id=example.seq_id, input_ids=np.asarray(example.input_ids, np.int32), positions=positions,
                topk_ids=np.stack([t[0] for t in tops]), topk_logprobs=np.stack([t[1] for t in tops])))
        progress(sum(len(r.positions) for r in records))
        return records

    def choices(self) -> list[list]:
        """[seq_id, sample, layer, position, experts chosen, router logits] of the forwards so far
        (`record_choices`), from the first worker (every worker routes alike)."""
        return self.llm.collective_rpc("moekd_choices")[0]


def top_k(logprobs, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs) (T, k) of the top k at `positions` from a request's flat prompt log-probs, whose entry
    p + 1 is the distribution at p (the prompt token's own entry comes first, and again if in the top k)."""
    ids = np.zeros((len(positions), k), np.int64)
    values = np.zeros((len(positions), k), np.float32)
    for t, p in enumerate(positions):
        lo, hi = logprobs.start_indices[p + 1], logprobs.end_indices[p + 1]
        entries = {int(token): (rank, value) for token, rank, value in
                   zip(logprobs.token_ids[lo:hi], logprobs.ranks[lo:hi], logprobs.logprobs[lo:hi]) if rank <= k}
        best = sorted(entries.items(), key=lambda item: item[1][0])[:k]
        if len(best) < k:
            raise MoekdError(f"vLLM returned {len(best)} log-probs at a position, not {k}")
        ids[t] = [token for token, _ in best]
        values[t] = [value for _, (_, value) in best]
    return ids, values


# ---------------------------------------------------------------- in the engine's workers

class EngineRouting:
    """The routing override of one worker: which row is which, and each layer's routing for the mode."""

    def __init__(self, runner, routing: RoutingConfig, record: bool):
        self.runner, self.routing, self.record = runner, routing, record
        self.requests: dict[str, tuple[int, int, int]] = {}
        self.draws: dict[tuple[int, int], list] = {}  # (seq_id, sample) -> ka_draws
        self.rows: list | None = None  # per layer (rows sampled, their noise) in this forward
        self.keys: list | None = None  # per row: (seq_id, sample, position)
        self.calls: list[int] = []
        self.rules: list[RouterRule] = []  # per layer
        self.chosen: dict = {}

    def begin(self, module, args, kwargs) -> None:
        """Model forward pre-hook: map this forward's rows to (request, position) and gather KA's draws."""
        batch = self.runner.input_batch
        count = batch.num_reqs
        starts = self.runner.query_start_loc.np[: count + 1]
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None).cpu()
        keys = []
        rows, noise = [[] for _ in self.experts], [[] for _ in self.experts]
        for i, request in enumerate(batch.req_ids[:count]):
            seq_id, sample, length = self.requests[request.split("-", 1)[0]]
            where = positions[starts[i] : starts[i + 1]]
            keys += [(seq_id, sample, int(p)) for p in where]
            if self.routing.mode != "ka" or not len(where):
                continue
            if (seq_id, sample) not in self.draws:
                self.draws[(seq_id, sample)] = ka_draws(self.routing, seq_id, sample, length, self.experts)
            for layer, (sampled, gumbels) in enumerate(self.draws[(seq_id, sample)]):
                here = (sampled >= where[0]) & (sampled <= where[-1])  # a request's rows: consecutive positions
                rows[layer].append(int(starts[i]) + sampled[here] - int(where[0]))
                noise[layer].append(gumbels[here])
        self.keys = keys
        self.rows = [(torch.cat(r) if r else torch.zeros(0, dtype=torch.long), torch.cat(n) if n else torch.zeros(0, e))
                     for r, n, e in zip(rows, noise, self.experts)]

    def route(self, layer: int, router, own, hidden_states, router_logits, indices_type, *, input_ids=None):
        """The router's (weights, ids) under the routing mode, by the transformers backend's rule (`routing`):
        KA's sampled tokens draw k experts from softmax(logits) over all experts (no groups, no bias); with
        k_s = k the others keep the router's own choice, groups and bias included; `all`, `top_p` and k_s != k
        rank every expert by the family's score plus its bias. Weights: the family's score of each chosen
        expert (softmax, or sigmoid), renormalised if the router renormalises, times its routed scale."""
        self.calls[layer] += 1
        mode, logits, rule = self.routing.mode, router_logits.float(), self.rules[layer]
        if mode == "topk":
            return own(hidden_states, router_logits, indices_type, input_ids=input_ids)
        keep, own_weights = None, None
        if mode == "all":
            ids = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        elif mode == "top_p":
            ids, keep = top_p_experts(logits, self.routing.top_p)
        else:
            k_s = self.routing.k_s or router.top_k
            if k_s == router.top_k:
                own_weights, ids = own(hidden_states, router_logits, indices_type, input_ids=input_ids)
                ids = ids.long()
            else:
                ids = rule.selection(logits).topk(k_s, dim=-1).indices
            rows, noise = self.rows[layer]
            if rows.numel():
                rows = rows.to(logits.device)
                ids = ids.index_put((rows,), (logits[rows] + noise.to(logits.device)).topk(ids.shape[1]).indices)
        weights = rule.weights(logits, ids, keep)
        if own_weights is not None:  # the tokens KA did not sample keep the router's own weights, bit for bit
            sampled = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            sampled[self.rows[layer][0].to(ids.device)] = True
            weights = torch.where(sampled[:, None], weights, own_weights.float())
        if self.record:  # for tests: what each (sequence, sample, layer, position) saw and chose
            for key, row, scores_row in zip(self.keys, ids.cpu(), logits.cpu()):
                self.chosen.setdefault((key[0], key[1], layer), {})[key[2]] = (row.tolist(), scores_row.tolist())
        return weights.float().contiguous(), ids.to(indices_type or torch.int32).contiguous()


@dataclass(frozen=True)
class RouterRule:
    """How one vLLM router scores and weighs experts, read from the router itself (`router_rule`)."""

    score: str  # softmax over the experts, or a sigmoid of each logit
    renormalize: bool  # the chosen weights are divided by their sum
    scale: float  # then multiplied by this (routed_scaling_factor, where the router applies it)
    bias: torch.Tensor | None  # added to the score to choose experts (e_score_correction_bias), not to weigh them

    def selection(self, logits: torch.Tensor) -> torch.Tensor:
        """What experts are ranked by when the router's own choice is not kept: score plus bias."""
        scores = expert_scores(self.score, logits)
        return scores if self.bias is None else scores + self.bias.float().to(scores.device)

    def weights(self, logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        weights = expert_scores(self.score, logits).gather(1, ids)
        if keep is not None:
            weights = weights * keep
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.scale


def router_rule(router) -> RouterRule | str:
    """The router's rule, or why moekd cannot restate it (a routing function or score it does not know)."""
    custom = getattr(router, "custom_routing_function", None)
    if getattr(router, "_hash_indices_table", None) is not None:
        return "hash-routed layers"
    if custom is not None:
        if getattr(custom, "__qualname__", "") != "Llama4MoE.custom_routing_function":
            return f"a custom routing function ({getattr(custom, '__qualname__', custom)})"
        return RouterRule("sigmoid", False, 1.0, None)  # Llama-4: top-k logits, each weighed by its sigmoid
    score = getattr(router, "scoring_func", "softmax")
    if score not in ("softmax", "sigmoid"):
        return f"{score} scores"
    return RouterRule(score, bool(getattr(router, "renormalize", True)),
                      float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
                      getattr(router, "e_score_correction_bias", None))


class WorkerExtension:
    """Methods vLLM adds to its worker class (`worker_extension_cls`), which `collective_rpc` calls by name in
    every worker with plain data: installing the routing override and talking to it."""

    def moekd_install_routing(self, routing: dict, record: bool) -> tuple[list[str], str | None]:
        """Override every MoE router of this worker's model with `routing` (`to_dict` of a RoutingConfig);
        the routers' names, and why the routing cannot be applied (None if it can). A refusal is returned, not
        raised: an exception in a worker of a multi-process engine kills the engine, burying the reason."""
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        routing = RoutingConfig(**routing)
        runner = self.model_runner
        state = EngineRouting(runner, routing, record)
        found = [(name, module.router) for name, module in runner.model.named_modules()
                 if isinstance(getattr(module, "router", None), BaseRouter)]
        names = [name for name, _ in found]
        if not found and routing.mode != "topk":
            return names, (f"vLLM's model has no MoE router moekd can override: routing.mode={routing.mode} "
                           "needs one")
        rules = [router_rule(router) for _, router in found]
        for name, rule in zip(names, rules):
            if isinstance(rule, str) and routing.mode != "topk":
                return names, (f"{name}: vLLM routes this family with {rule}, which moekd's vLLM backend does not "
                               f"reproduce for routing.mode={routing.mode}; use backend=transformers")
        several = routing.mode in ("all", "top_p") or (routing.mode == "ka" and (routing.k_s or 0) > 1)
        for name, module in runner.model.named_modules():
            if several and getattr(module, "apply_router_weight_on_input", False):
                return names, (f"{name}: vLLM weighs this family's expert input by its router weight (Llama-4), "
                               f"which its kernels do for one expert per token only; routing.mode={routing.mode} "
                               "chooses several: use backend=transformers")
        state.rules = rules
        state.experts = [router.global_num_experts for _, router in found]
        state.calls = [0] * len(found)
        for layer, (_, router) in enumerate(found):
            router._compute_routing = partial(state.route, layer, router, router._compute_routing)
        runner.model.register_forward_pre_hook(state.begin, with_kwargs=True)
        self.moekd_routing = state
        return names, None

    def moekd_set_requests(self, table: dict) -> None:
        """The requests of the next generate call: vLLM request-id prefix -> (seq_id, sample, length)."""
        state = self.moekd_routing
        state.requests = table
        state.draws, state.chosen = {}, {}

    def moekd_override_calls(self) -> list[int]:
        """How often each MoE layer's override has run."""
        return list(self.moekd_routing.calls)

    def moekd_choices(self) -> list[list]:
        """The recorded routing choices, as `VllmTeacher.choices` gives them."""
        return [[*key, position, ids, logits] for key, rows in self.moekd_routing.chosen.items()
                for position, (ids, logits) in rows.items()]
