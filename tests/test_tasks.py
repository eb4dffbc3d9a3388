"""The generated task suite: pinned, deterministic, large and varied enough, and right."""

from __future__ import annotations

import collections
import re

import pytest

from pipeline.embedded import tasks, vocabulary


@pytest.fixture(scope="module")
def suite():
    return tasks.generate_suite()


def test_the_suite_is_the_pinned_one_and_generating_it_again_gives_the_same_bytes(suite):
    assert tasks.suite_sha256(suite) == tasks.SUITE_SHA256
    assert tasks.suite_bytes(tasks.generate_suite()) == tasks.suite_bytes(suite)
    assert tasks.suite_sha256(tasks.generate_suite(seed=1)) != tasks.SUITE_SHA256  # the seed matters


def test_enough_tasks_domains_and_unseen_examples(suite):
    training = [t for t in tasks.TASKS if not t.heldout]
    heldout = [t for t in tasks.TASKS if t.heldout]
    assert len(training) >= 40 and len({t.domain for t in training}) >= 4
    assert {t.domain for t in tasks.TASKS} == set(tasks.DOMAINS)
    assert all(t.domain in tasks.DOMAINS and t.name.count("/") == 1 for t in tasks.TASKS)
    assert len({t.name for t in tasks.TASKS}) == len(tasks.TASKS)
    per_domain = collections.Counter(t.domain for t in heldout)
    assert all(per_domain[d] >= 2 for d in tasks.DOMAINS)  # every domain has unseen tasks
    assert sum(r["heldout"] for r in suite) >= 1000
    for task in tasks.TASKS:  # every training task can fill a validation split and a training split
        count = sum(r["source"] == task.name for r in suite)
        assert count >= 30, (task.name, count)


def test_most_answers_are_short_and_exact(suite):
    """Exact match is meaningful: most tasks answer with one word, number or short list."""
    short = collections.Counter()
    for task in tasks.TASKS:
        rows = [r for r in suite if r["source"] == task.name]
        short[task.name] = all(len(r["response"].split()) <= 3 for r in rows)
    assert sum(short.values()) >= 0.75 * len(tasks.TASKS)
    assert not all(short.values())  # a few tasks rewrite a sentence (ROUGE-L has something to measure)


def test_examples_are_distinct_per_task_and_records_complete(suite):
    for task in tasks.TASKS:
        inputs = [r["context"] for r in suite if r["source"] == task.name]
        assert len(inputs) == len(set(inputs))
    for r in suite[::97]:
        assert r["response"] == r["references"][0] and r["instruction"] and r["context"]
        assert len(set(r["references"])) == len(r["references"])


def answers(suite, name):
    return [(r["context"], r["references"]) for r in suite if r["source"] == name]


def test_answers_are_right(suite):
    """Spot checks that recompute each kind of answer from the input text alone."""
    for text, refs in answers(suite, "arithmetic/add"):
        a, b = map(int, text.split(" + "))
        assert refs == [str(a + b)]
    for text, refs in answers(suite, "arithmetic/round_to_ten"):
        assert abs(int(refs[0]) - int(text)) < 5 and int(refs[0]) % 10 == 0
    for text, refs in answers(suite, "lists/sort_descending"):
        assert refs[0].split(", ") == sorted(text.split(", "), key=int, reverse=True)
    for text, refs in answers(suite, "text/reverse"):
        assert refs == [text[::-1]]
    for text, refs in answers(suite, "time/day_before"):
        n, start = re.fullmatch(r"(\d+) days? before (\w+)", text).groups()
        assert vocabulary.WEEKDAYS.index(refs[0]) == (vocabulary.WEEKDAYS.index(start) - int(n)) % 7
    for text, refs in answers(suite, "time/clock_after"):
        n, hour = map(int, re.fullmatch(r"(\d+) hours? after (\d+) o'clock", text).groups())
        assert refs == [f"{(hour + n - 1) % 12 + 1} o'clock"]
    for text, refs in answers(suite, "language/negative"):
        assert " not " in refs[0] and refs[0].split()[0] == text.split()[0]
    capitals = {c[0]: c[1] for c in vocabulary.COUNTRIES}
    for text, refs in answers(suite, "facts/capital"):
        assert refs == capitals[text]


def test_draws_are_uniform_within_bounds():
    draw = vocabulary.Draw(7)
    values = [draw.integer(3, 6) for _ in range(4000)]
    assert set(values) == {3, 4, 5, 6}
    assert max(collections.Counter(values).values()) < 1.15 * 1000
    picked = draw.sample(range(10), 10)
    assert sorted(picked) == list(range(10))
    assert vocabulary.Draw(7).integer(0, 10 ** 6) == vocabulary.Draw(7).integer(0, 10 ** 6)
