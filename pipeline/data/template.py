"""From an instruction record to a prepared row: prompt templates, fitting to a length, calibration tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.core.errors import MoekdError
from pipeline.data.records import MAX_RECORD_BYTES, read_records

# Used when template="chat" but the tokenizer has no chat template.
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PLAIN_TEMPLATE_NO_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(kw_only=True)
class RecordFields:
    """Which record keys hold what (context, references and source are optional)."""

    instruction: str
    context: str
    response: str
    references: str
    source: str


class Template:
    """Turns (instruction, context, response) into token ids and the prompt length.

    "chat" renders the tokenizer's chat template (user turn, then the assistant
    turn up to and including its end-of-turn token) and falls back to
    PLAIN_TEMPLATE without one; any other value is a format string with
    {instruction} and {context} giving the prompt, then response + eos.
    """

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.chat = template == "chat" and bool(tokenizer.chat_template)
        if self.chat:
            self.text = json.dumps(tokenizer.chat_template, sort_keys=True)
            self.end_tokens = set(tokenizer.all_special_tokens) | {
                str(t) for t in tokenizer.added_tokens_decoder.values() if t.special
            }
            return
        if template == "chat":
            self.formats = (PLAIN_TEMPLATE, PLAIN_TEMPLATE_NO_CONTEXT)
        else:
            check_format_string(template)
            self.formats = (template, template)
        self.text = "\n".join(self.formats)
        if tokenizer.eos_token_id is None:
            raise MoekdError("the tokenizer has no eos_token, which ends every response in a non-chat template")

    def encode(self, instruction: str, context: str, response: str) -> tuple[list[int], int]:
        """(prompt + response token ids, number of prompt tokens)."""
        if self.chat:
            prompt, reply = self.render_chat(instruction, context, response)
            suffix, special = [], False  # the template writes bos/eos itself
        else:
            prompt = self.formats[0 if context else 1].format(instruction=instruction, context=context)
            reply, suffix, special = response, [self.tokenizer.eos_token_id], True
        prompt_ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        ids = self.tokenizer(prompt + reply, add_special_tokens=special)["input_ids"] + suffix
        return ids, common_prefix_length(prompt_ids, ids)

    def render_chat(self, instruction: str, context: str, response: str) -> tuple[str, str]:
        """(generation prompt text, assistant reply text ending with the end-of-turn token)."""
        user = [{"role": "user", "content": f"{instruction}\n\n{context}" if context else instruction}]
        apply = self.tokenizer.apply_chat_template
        prompt = apply(user, add_generation_prompt=True, tokenize=False)
        full = apply(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise MoekdError(
                "the tokenizer's chat template renders a conversation that does not start with its "
                "generation prompt; set template to a format string instead"
            )
        reply = full[len(prompt):]
        content = reply.find(response.strip())
        if content < 0:
            raise MoekdError("the tokenizer's chat template changes the response text; set template to a format string")
        content += len(response.strip())
        ends = [(i, t) for t in self.end_tokens if (i := reply.find(t, content)) >= 0]
        if not ends:
            raise MoekdError(
                "the tokenizer's chat template does not end the assistant turn with a special token; "
                "set template to a format string"
            )
        i, token = min(ends)
        return prompt, reply[: i + len(token)]


def check_format_string(template: str) -> None:
    if "{instruction}" not in template:
        raise MoekdError(f"template {template!r} is neither \"chat\" nor a format string with {{instruction}}")
    try:
        template.format(instruction="", context="")
    except (KeyError, IndexError, ValueError) as e:
        raise MoekdError(
            f"template {template!r} must be a format string of only {{instruction}} and {{context}}: {e!r}"
        ) from None


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens the prompt shares with the full sequence (less than the prompt only if BPE merged across the boundary)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


Truncation = Literal["left", "skip"]


def fit_length(ids: list[int], prompt_length: int, max_length: int, truncation: Truncation) -> tuple[list[int], int] | str:
    """(ids, prompt length) cut to `max_length` tokens, or the reason the example is skipped.

    `left` keeps the response and the end of the prompt: the prompt loses its
    first tokens, keeping at least min(its length, max_length // 2), and only a
    response too long for the rest is cut on the right. `skip` cuts on the
    right and skips an example whose prompt alone fills `max_length`.
    """
    if len(ids) <= max_length:
        return ids, prompt_length
    if truncation == "skip":
        return (ids[:max_length], prompt_length) if prompt_length < max_length else "prompt_too_long"
    response_length = len(ids) - prompt_length
    keep = min(prompt_length, max(max_length - response_length, max_length // 2))
    return ids[prompt_length - keep : prompt_length - keep + max_length], keep


def example_from_record(
    record: dict, fields: RecordFields, template: Template, max_length: int, default_source: str,
    truncation: Truncation = "left", max_record_bytes: int = MAX_RECORD_BYTES,
) -> dict | str:
    """A prepared row (SCHEMA's columns, and "cut": what truncation removed) from one record, or the reason
    it is skipped (`fit_length`)."""
    instruction, response = record.get(fields.instruction), record.get(fields.response)
    if instruction is None or response is None:  # absent, or null in a table
        return "missing_field"
    context = record.get(fields.context) or ""
    source = record.get(fields.source) or default_source
    references = record.get(fields.references) or []
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list):
        return "not_string"
    texts = [instruction, response, context, source, *references]
    if not all(isinstance(t, str) for t in texts):
        return "not_string"
    try:
        size = sum(len(t.encode("utf-8")) for t in texts)
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): not text a tokenizer takes
        return "invalid_text"
    if size > max_record_bytes:
        return "record_too_large"
    if not instruction.strip() or not response.strip():
        return "empty_field"
    full_ids, full_prompt_length = template.encode(instruction, context, response)
    fitted = fit_length(full_ids, full_prompt_length, max_length, truncation)
    if isinstance(fitted, str):
        return fitted
    ids, prompt_length = fitted
    cut = {"prompt_truncated": prompt_length < full_prompt_length,
           "response_truncated": len(ids) - prompt_length < len(full_ids) - full_prompt_length}
    return {
        "cut": [reason for reason, happened in cut.items() if happened],  # not stored: counted by `prepare`
        "input_ids": ids,
        "response_mask": [t >= prompt_length for t in range(len(ids))],
        "prompt_length": prompt_length,
        "references": [response] + [r for r in references if r != response],
        "source": source,
    }


def calibration_ids(path: Path, tokenizer, tokens: int, sequence_length: int) -> torch.Tensor:
    """(B, sequence_length) token ids: instruction records of `path` in file order, chat-formatted and
    packed end to end, at most `tokens` in all (what upcycling and width pruning measure activations on)."""
    return labelled_calibration_ids(path, tokenizer, tokens, sequence_length)[0]


def labelled_calibration_ids(path: Path, tokenizer, tokens: int, sequence_length: int,
                             label_field: str | None = None) -> tuple[torch.Tensor, list]:
    """`calibration_ids`, and each token's label: the value of its record's `label_field` (None without one),
    a list of B * sequence_length in the ids' order (what a router fitted per domain learns from)."""
    if tokens < sequence_length:
        raise MoekdError(f"calibration_tokens {tokens} is less than sequence_length {sequence_length}: "
                         "not even one calibration sequence")
    if not Path(path).is_file():
        raise MoekdError(f"calibration data not found: {path}")
    template = Template(tokenizer, "chat")
    fields = RecordFields(instruction="instruction", context="context", response="response", references="references",
                          source="source")
    ids: list[int] = []
    labels: list = []
    for record in read_records(Path(path)):
        example = example_from_record(record, fields, template, 1 << 30, "") if isinstance(record, dict) else record
        if isinstance(example, dict):  # a string is the reason a record is unusable: skip it
            label = record.get(label_field) if label_field else None
            if label_field and not isinstance(label, str):
                raise MoekdError(f"calibration data {path}: a record has no text field {label_field!r}")
            ids += example["input_ids"]
            labels += [label] * len(example["input_ids"])
        if len(ids) >= tokens:
            break
    rows = min(len(ids), tokens) // sequence_length
    if rows < 1:
        raise MoekdError(f"calibration data {path} holds {len(ids)} tokens, fewer than one sequence of "
                         f"{sequence_length}")
    kept = rows * sequence_length
    return torch.tensor(ids[:kept]).view(rows, sequence_length), labels[:kept]

