"""Does an MoE teacher's routing hold knowledge a student could use? Diagnostics from forward passes.

Over a prepared held-out split whose examples are grouped (by domain: a
task's source up to its "/", or by source), for any MoE family moekd routes:

- router mass: per MoE layer, the mean share of the router's probability
  (the family's expert scores, normalised) outside the experts it chooses:
  the paper's motivating statistic. Nothing outside the top-k leaves KA
  nothing to sample.
- expert drop: per group × expert, the held-out cross-entropy change when
  that expert is left out of every token's choice (the next best takes its
  place). Experts that specialise show a dominant diagonal (their own
  domain suffers most); slices of one FFN show no structure.
- active experts: held-out cross-entropy with the k best experts, k = 1..E.
- KA headroom: the mean KL(top-k routing ‖ KA sample) and KL between two KA
  samples, per response token, beside the student's KL(teacher ‖ student) at
  its start: if the samples differ from the teacher by far less than the
  student does, KA cannot change what the student learns.
- expert choice and domain: per layer, the mutual information (bits) between
  a token's top-1 expert and its group.

Cross-entropy is per response token (the targets moekd trains on); changes
carry a standard error over held-out examples (the ratio estimator's
linearisation), the noise a different sample of held-out examples would bring.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.batch import collate_examples
from pipeline.data.prepared import PreparedExample
from pipeline.models.logprobs import target_hidden, vocab_logprobs
from pipeline.teacher.families import expert_scores, find_routers
from pipeline.teacher.routing import RoutingConfig, RoutingHooks


@dataclass
class Sums:
    """Per-example summed cross-entropy (nats) and target counts of one routing variant."""

    nll: np.ndarray
    tokens: np.ndarray


@dataclass
class Measurements:
    """Everything the diagnostics measure, per example where it is per example (in `groups`' order)."""

    groups: list[str]  # each example's group
    experts: int
    top_k: int
    _: KW_ONLY
    variants: dict[str, Sums] = field(default_factory=dict)  # "topk", "drop e", "k=j", "student", "dense"
    mass_outside: list[float] = field(default_factory=list)  # per layer
    choices: np.ndarray | None = None  # (layers, groups, experts): top-1 choice counts over real tokens
    kl: dict[str, float] = field(default_factory=dict)  # mean per response token: "ka_sample", "between_samples", ...


def example_group(source: str, group_by: str) -> str:
    return source.split("/")[0] if group_by == "domain" else source


def group_names(groups: list[str]) -> list[str]:
    return list(dict.fromkeys(groups))


@torch.no_grad()
def measure(teacher, examples: list[PreparedExample], pad_id: int, *, group_by: str = "domain",
            ka: RoutingConfig | None = None, student=None, dense=None, batch_size: int = 16) -> Measurements:
    """Run every routing variant of `teacher` over `examples`, batch by batch (so that full distributions are
    only ever held for one batch), and the optional `student` and `dense` model beside it."""
    routers = find_routers(teacher)
    experts, top_k = routers[0].num_experts, routers[0].top_k
    groups = [example_group(e.source, group_by) for e in examples]
    names = group_names(groups)
    variants = ["topk", *(f"drop {e}" for e in range(experts)), *(f"k={k}" for k in range(1, experts + 1))]
    sums = {name: (np.zeros(len(examples)), np.zeros(len(examples))) for name in
            variants + (["student"] if student is not None else []) + (["dense"] if dense is not None else [])}
    mass = torch.zeros(len(routers), dtype=torch.float64)
    choices = torch.zeros(len(routers), len(names), experts, dtype=torch.float64)
    kl_sums = {"ka_sample": 0.0, "between_samples": 0.0, "student": 0.0}
    real_tokens = targets = 0
    device = next(teacher.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    for start in tqdm(range(0, len(order), batch_size), desc="diagnose", unit="batch"):
        indices = order[start : start + batch_size]
        batch = collate_examples([examples[i] for i in indices], pad_id).to(device)
        row_group = torch.tensor([names.index(groups[i]) for i in indices])

        def forward(model, hooks: RoutingHooks | None = None, sample: int = 0) -> torch.Tensor:
            if hooks is not None and hooks.config.mode == "ka":
                with hooks.sequences(batch.seq_ids, sample, batch.attention_mask):
                    hidden = target_hidden(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
            else:
                hidden = target_hidden(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
            return vocab_logprobs(model, hidden).float()

        def record(name: str, logprobs: torch.Tensor) -> None:
            nll = -logprobs.gather(-1, batch.targets[:, None])[:, 0].double().cpu()
            per_row = torch.zeros(len(indices), dtype=torch.float64).index_add_(0, batch.rows.cpu(), nll)
            counts = torch.bincount(batch.rows.cpu(), minlength=len(indices)).double()
            sums[name][0][indices] += per_row.numpy()
            sums[name][1][indices] += counts.numpy()

        with RoutingHooks(teacher, RoutingConfig()) as hooks:
            hooks.record_logits = True
            top = forward(teacher, hooks)
            real = batch.attention_mask.reshape(-1).bool().cpu()
            token_group = row_group[:, None].expand_as(batch.attention_mask.cpu()).reshape(-1)[real]
            for layer, (router, logits) in enumerate(zip(routers, hooks.router_logits)):
                scores = expert_scores(router.rule.score, logits.float()).cpu()[real]
                scores = scores / scores.sum(-1, keepdim=True)
                chosen = hooks.chosen[layer].cpu()[real][:, :top_k]
                mass[layer] += (1 - scores.gather(1, chosen).sum(-1)).sum().double()
                choices[layer].index_put_((token_group, scores.argmax(-1)), torch.ones(len(chosen), dtype=torch.float64),
                                          accumulate=True)
            real_tokens += int(real.sum())
        record("topk", top)
        for e in range(experts):
            with RoutingHooks(teacher, RoutingConfig(), drop=e) as hooks:
                record(f"drop {e}", forward(teacher, hooks))
        for k in range(1, experts + 1):
            with RoutingHooks(teacher, RoutingConfig(mode="ka", lam=0.0, k_s=k)) as hooks:
                record(f"k={k}", forward(teacher, hooks))
        if ka is not None:
            with RoutingHooks(teacher, ka) as hooks:
                samples = [forward(teacher, hooks, m) for m in range(ka.samples)]
            kl_sums["ka_sample"] += sum(kl(top, s) for s in samples) / len(samples)
            if len(samples) > 1:
                kl_sums["between_samples"] += kl(samples[0], samples[1])
        if student is not None:
            logprobs = forward(student)
            record("student", logprobs)
            kl_sums["student"] += kl(top, logprobs)
        if dense is not None:
            record("dense", forward(dense))
        targets += batch.tokens
    measured = Measurements(groups, experts, top_k)
    measured.variants = {name: Sums(nll, tokens) for name, (nll, tokens) in sums.items()}
    measured.mass_outside = (mass / max(real_tokens, 1)).tolist()
    measured.choices = choices.numpy()
    keys = (["ka_sample"] + (["between_samples"] if ka.samples > 1 else [])) if ka is not None else []
    measured.kl = {key: kl_sums[key] / max(targets, 1) for key in keys + (["student"] if student is not None else [])}
    return measured


def kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> float:
    """Σ over targets of KL(p ‖ q) over the whole vocabulary, from log-probabilities (N, V)."""
    return float((p_logprobs.exp() * (p_logprobs - q_logprobs)).sum())


# ---------------------------------------------------------------- summaries

def ratio_change(a: Sums, b: Sums, mask: np.ndarray) -> tuple[float, float]:
    """(Σ(a.nll − b.nll) / Σ tokens over the masked examples, its standard error over examples): the change of
    per-token cross-entropy from b to a, with the ratio estimator's linearised standard error."""
    delta, tokens = (a.nll - b.nll)[mask], a.tokens[mask]
    total = tokens.sum()
    if total == 0:
        return math.nan, math.nan
    ratio = delta.sum() / total
    residual = delta - ratio * tokens
    n = len(delta)
    se = math.sqrt(n / max(n - 1, 1) * (residual ** 2).sum()) / total
    return float(ratio), float(se)


def per_token(s: Sums, mask: np.ndarray) -> float:
    return float(s.nll[mask].sum() / max(s.tokens[mask].sum(), 1))


def mutual_information(counts: np.ndarray) -> float:
    """Mutual information (bits) of a (groups, experts) table of counts."""
    joint = counts / counts.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    inside = joint > 0
    return float((joint[inside] * np.log2(joint[inside] / outer[inside])).sum())


def summarize(measured: Measurements, expert_names: list[str] | None = None) -> dict:
    """The report: per-group cross-entropy, the expert-drop matrix with standard errors, cross-entropy by the
    number of active experts, router mass and mutual information per layer, KA headroom; and, where the
    experts are named after the groups (a Branch-Train-MiX teacher), the diagonal against the rest."""
    groups = np.array(measured.groups)
    names = group_names(measured.groups)
    everything = np.ones(len(groups), dtype=bool)
    masks = {name: groups == name for name in names}
    v = measured.variants
    top = v["topk"]
    drop = {name: [ratio_change(v[f"drop {e}"], top, mask) for e in range(measured.experts)]
            for name, mask in masks.items()}
    report = {
        "experts": measured.experts,
        "top_k": measured.top_k,
        "groups": {name: {"examples": int(mask.sum()), "tokens": int(top.tokens[mask].sum()),
                          "teacher_ce": per_token(top, mask)} for name, mask in masks.items()},
        "teacher_ce": per_token(top, everything),
        "expert_drop": {name: [{"change": c, "se": se} for c, se in row] for name, row in drop.items()},
        "ce_by_active_experts": {str(k): per_token(v[f"k={k}"], everything) for k in range(1, measured.experts + 1)},
        "mass_outside_topk": measured.mass_outside,
        "mean_mass_outside_topk": float(np.mean(measured.mass_outside)),
        "mutual_information_bits": [mutual_information(c) for c in measured.choices],
        "kl": measured.kl,
    }
    for extra in ("student", "dense"):
        if extra in v:
            report[f"{extra}_ce"] = per_token(v[extra], everything)
            for name, mask in masks.items():
                report["groups"][name][f"{extra}_ce"] = per_token(v[extra], mask)
    if expert_names is not None and sorted(expert_names) == sorted(names):
        report["expert_names"] = list(expert_names)
        report["specialisation"] = specialisation(v, masks, expert_names, top)
    return report


def specialisation(v: dict[str, Sums], masks: dict[str, np.ndarray], expert_names: list[str], top: Sums) -> dict:
    """Per group: the cross-entropy change from dropping its own expert, the mean change from dropping any
    other, and own − others with its standard error (paired over the group's examples)."""
    rows = {}
    for name, mask in masks.items():
        own = expert_names.index(name)
        others = [e for e in range(len(expert_names)) if e != own]
        other_sums = Sums(np.mean([v[f"drop {e}"].nll for e in others], 0), top.tokens)
        rows[name] = {
            "own": ratio_change(v[f"drop {own}"], top, mask)[0],
            "others": ratio_change(other_sums, top, mask)[0],
            "own_minus_others": ratio_change(v[f"drop {own}"], other_sums, mask),
        }
    own = np.mean([r["own"] for r in rows.values()])
    others = np.mean([r["others"] for r in rows.values()])
    return {"per_group": rows, "mean_own": float(own), "mean_others": float(others)}


def markdown(report: dict, title: str) -> str:
    """The report as the tables `moekd diagnose` prints."""
    lines = [f"# {title}", "",
             f"{report['experts']} experts, top-{report['top_k']}; held-out cross-entropy {report['teacher_ce']:.3f} "
             "nats per response token.", ""]
    names = report.get("expert_names") or [str(e) for e in range(report["experts"])]
    lines += ["## Expert drop: held-out cross-entropy change (nats) when an expert is left out, ± its standard "
              "error over examples", "",
              "| group | examples | teacher | " + " | ".join(f"drop {n}" for n in names) + " |",
              "|---|---:|---:|" + "---:|" * len(names)]
    for group, row in report["expert_drop"].items():
        info = report["groups"][group]
        cells = " | ".join(f"{c['change']:+.3f} ± {c['se']:.3f}" for c in row)
        lines.append(f"| {group} | {info['examples']} | {info['teacher_ce']:.3f} | {cells} |")
    if "specialisation" in report:
        s = report["specialisation"]
        lines += ["", f"Dropping a group's own expert raises its cross-entropy by {s['mean_own']:+.3f} nats on "
                  f"average; dropping another expert by {s['mean_others']:+.3f}.", "",
                  "| group | own expert | other experts (mean) | own − others ± se |", "|---|---:|---:|---:|"]
        for group, r in s["per_group"].items():
            diff, se = r["own_minus_others"]
            lines.append(f"| {group} | {r['own']:+.3f} | {r['others']:+.3f} | {diff:+.3f} ± {se:.3f} |")
    k_values = report["ce_by_active_experts"]
    lines += ["", "## Cross-entropy by the number of active experts", "",
              "| " + " | ".join(f"k={k}" for k in k_values) + " |" + (" dense |" if "dense_ce" in report else ""),
              "|" + "---:|" * (len(k_values) + ("dense_ce" in report)),
              "| " + " | ".join(f"{v:.3f}" for v in k_values.values()) + " |"
              + (f" {report['dense_ce']:.3f} |" if "dense_ce" in report else "")]
    mass, info = report["mass_outside_topk"], report["mutual_information_bits"]
    lines += ["", "## Routing per layer", "",
              f"Router probability outside the top-{report['top_k']}: mean {report['mean_mass_outside_topk']:.3f} "
              f"(layers {min(mass):.3f}–{max(mass):.3f}); mutual information between the top-1 expert and the "
              f"group: mean {np.mean(info):.3f} bits (layers {min(info):.3f}–{max(info):.3f}; the groups hold "
              f"{math.log2(len(report['groups'])):.2f} bits).", ""]
    if report["kl"]:
        kl = report["kl"]
        parts = [f"KL(top-k ‖ KA sample) {kl['ka_sample']:.4f}"]
        if "between_samples" in kl:
            parts.append(f"KL between two KA samples {kl['between_samples']:.4f}")
        if "student" in kl:
            parts.append(f"the student's KL(teacher ‖ student) at its start {kl['student']:.4f}")
        lines += ["## KA headroom (nats per response token)", "", "; ".join(parts) + ".", ""]
    return "\n".join(lines) + "\n"
