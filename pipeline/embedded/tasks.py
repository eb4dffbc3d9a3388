"""The embedded default's instruction data: 73 tasks in six domains, generated from a seed.

No archive can be withdrawn from under it: every example is made here, from
the word and fact tables of `vocabulary` and Python's seeded Mersenne
Twister, so the same seed gives the same records on any machine (`SUITE_SHA256` pins them;
`fetch` checks it). Each task is one instruction (the task's definition) and a
generator of (input, references) pairs; the first reference is the response
trained on, every reference counts for ROUGE-L and exact match.

Six domains, each a different skill, so that a teacher can grow one expert per
domain: `arithmetic` (numbers), `text` (letters of words), `lists` (ordering
and picking items), `language` (English morphology and sentence grammar),
`facts` (world knowledge: geography, chemistry, animals) and `time` (calendar,
clock and unit conversions). Of each domain's tasks, the last two or three are
unseen tasks (`heldout`): related to its training tasks (a triple beside a
double, the day before beside the day after) but never trained on, as
Super-NaturalInstructions evaluates unseen tasks. Nearly every answer is a
word, a number or a short list; a few tasks rewrite a sentence.

The tasks themselves are `domains`.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.core.seeding import derive_seed
from pipeline.embedded.domains import _arithmetic, _facts, _language, _lists, _text, _time
from pipeline.embedded.vocabulary import Draw, Example, Task

DOMAINS = ("arithmetic", "text", "lists", "language", "facts", "time")


# sha256 of `suite_bytes(generate_suite(SEED, EXAMPLES_PER_TASK))`: a change to the tasks, or a platform on
# which they come out differently, shows as a mismatch (tests/test_tasks.py, `moekd fetch`).
SEED = 0
EXAMPLES_PER_TASK = 240
SUITE_SHA256 = "15a070a0fdddc71cb5d826bcfb31d6a962a90051d4ee323eeb80d2f6062a814a"
TASKS: tuple[Task, ...] = (*_arithmetic(), *_text(), *_lists(), *_language(), *_facts(), *_time())


def task_examples(task: Task, seed: int, count: int) -> list[Example]:
    """Up to `count` examples of `task` with distinct inputs, drawn from a generator seeded by (seed, task).

    A task with fewer possible inputs (a fact table) gives them all; drawing
    stops after 50 draws per wanted example.
    """
    draw = Draw(derive_seed("tasks", seed, task.name))
    examples: dict[str, list[str]] = {}
    for _ in range(50 * count):
        if len(examples) == count:
            break
        text, references = task.make(draw)
        examples.setdefault(text, references)
    return list(examples.items())


def generate_suite(seed: int = SEED, per_task: int = EXAMPLES_PER_TASK) -> list[dict]:
    """Every task's examples as records of the `prepare` input format, task after task, plus each
    record's `domain` and `heldout` (an unseen task)."""
    return [
        {"instruction": task.instruction, "context": text, "response": references[0], "references": references,
         "source": task.name, "domain": task.domain, "heldout": task.heldout}
        for task in TASKS
        for text, references in task_examples(task, seed, per_task)
    ]


def suite_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def suite_sha256(records: list[dict]) -> str:
    return hashlib.sha256(suite_bytes(records)).hexdigest()

