"""`moekd eval` and pipeline.student.evaluation, on the fixture tokenizer, tiny teacher/students and word-task data."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import fixtures
import pipeline.data.prepared
import stages.eval
from pipeline.cache.identity import CacheIdentity, encoding_spec
from pipeline.cache.manifest import Manifest
from pipeline.cache.shards import read_shard, write_shard
from pipeline.core.errors import MoekdError
from pipeline.data.batch import collate_examples
from pipeline.data.prepared import PreparedData, target_positions
from pipeline.models.loading import load_model, load_tokenizer
from pipeline.student.evaluation import cache_kl, exact_match, example_losses, response_loss, rouge_l, select_examples
from pipeline.student.generation import generate, generate_ids, stop_token_ids
from pipeline.student.losses import LossConfig, sparse_divergence
from pipeline.teacher.capture import capture_batch
from pipeline.teacher.routing import RoutingConfig, RoutingHooks
from stages.cli import main
from stages.eval import Config, run
from stages.prepare import Config as PrepareConfig
from stages.prepare import run as prepare

EXAMPLE_CONFIG = Path(__file__).parent.parent / "configs" / "eval.yaml"
END_OF_TURN = 2  # <|im_end|> in the fixture tokenizer


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, tokenizer_dir) -> PreparedData:
    """20 word-task examples; the source of each is its task (five tasks, in turn)."""
    root = tmp_path_factory.mktemp("eval_data")
    path = fixtures.write_jsonl(root / "test.jsonl", fixtures.instruction_records(20, seed=5))
    prepare(PrepareConfig(inputs=[str(path)], output=str(root / "test"), tokenizer=str(tokenizer_dir),
                          source_field="task"))
    return PreparedData(root / "test")


@pytest.fixture(scope="module")
def extra_split(tmp_path_factory, tokenizer_dir) -> PreparedData:
    """A second split whose one source is its file's stem, "vicuna"."""
    root = tmp_path_factory.mktemp("eval_extra")
    path = fixtures.write_jsonl(root / "vicuna.jsonl", fixtures.instruction_records(8, seed=6, tasks=("reverse",)))
    prepare(PrepareConfig(inputs=[str(path)], output=str(root / "extra"), tokenizer=str(tokenizer_dir)))
    return PreparedData(root / "extra")


@pytest.fixture(scope="module")
def lively_student_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A student with large random weights, so its greedy output depends on the prompt."""
    return fixtures.make_student(tmp_path_factory.mktemp("lively"), tokenizer_dir, initializer_range=0.5)


def cpu_model(path):
    return load_model(path, dtype="float32", device="cpu")


def make_cache(directory: Path, teacher, data: PreparedData, k: int, routing: RoutingConfig, shard_rows: int = 4):
    """A teacher cache of `data` written with the cache format's own writer, `shard_rows` rows per shard."""
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    encoding = dict(vocab_size=vocab_size, k=k, num_samples=routing.samples, with_aggregate=False)
    identity = {"encoding": encoding_spec(**encoding), "tokenizer_fingerprint": data.tokenizer_fingerprint,
                "data_fingerprint": data.fingerprint, "rows": len(data), "shard_size": shard_rows}
    manifest = Manifest.open(directory, CacheIdentity(identity), {}, overwrite=False)
    with RoutingHooks(teacher, routing) as hooks:
        for index, start in enumerate(range(0, len(data), shard_rows)):
            batch = collate_examples(data.rows(start, start + shard_rows), 0)
            records = capture_batch(teacher, hooks, batch, k=k, num_samples=routing.samples, aggregate=False)
            manifest.commit(write_shard(directory, index, records, **encoding))
    return directory


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, moe_dir, test_split) -> Path:
    """The mixtral teacher's cache of the test split with k = the whole vocabulary (no tail)."""
    return make_cache(tmp_path_factory.mktemp("full_cache"), cpu_model(moe_dir("mixtral")), test_split,
                      k=fixtures.VOCAB_SIZE, routing=RoutingConfig())


# ---------------------------------------------------------------- loss and perplexity

def test_response_loss_is_cross_entropy_over_response_tokens(test_split, student_dir):
    model = cpu_model(student_dir)
    sums: dict[str, list[float]] = {}
    for example in test_split.rows(0, len(test_split)):
        ids = torch.from_numpy(example.input_ids.astype(np.int64))
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        positions = torch.from_numpy(target_positions(example.response_mask))
        nll = F.cross_entropy(logits[positions], ids[positions + 1], reduction="sum").item()
        total = sums.setdefault(example.source, [0.0, 0, 0])
        total[0] += nll
        total[1] += len(positions)
        total[2] += 1
    result = response_loss(model, test_split, batch_size=3)

    assert list(result["sources"]) == ["copy", "reverse", "sort", "count", "first"]
    for source, (nll, tokens, examples) in sums.items():
        by_source = result["sources"][source]
        assert (by_source["tokens"], by_source["examples"]) == (tokens, examples)
        assert by_source["loss"] == pytest.approx(nll / tokens, rel=1e-5)
        assert by_source["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    nll, tokens = sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values())
    assert result["tokens"] == tokens == test_split.meta["response_tokens"]
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert response_loss(model, test_split, batch_size=20)["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_select_examples_takes_evenly_spaced_rows_across_row_groups(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(pipeline.data.prepared, "ROW_GROUP_SIZE", 4)
    path = fixtures.write_jsonl(tmp_path / "d.jsonl", fixtures.instruction_records(22))
    prepare(PrepareConfig(inputs=[str(path)], output=str(tmp_path / "out"), tokenizer=str(tokenizer_dir)))
    data = PreparedData(tmp_path / "out")
    assert data.file.num_row_groups == 6
    everything = data.rows(0, len(data))
    assert [e.seq_id for e in select_examples(data)] == list(range(22))
    assert [e.seq_id for e in select_examples(data, 100)] == list(range(22))
    chosen = select_examples(data, 7)
    assert [e.seq_id for e in chosen] == [0, 3, 6, 9, 12, 15, 18]
    assert [e.input_ids.tolist() for e in chosen] == [everything[e.seq_id].input_ids.tolist() for e in chosen]


# ---------------------------------------------------------------- ROUGE-L

def lcs_length(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_is_the_lcs_f_measure_best_over_references():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == 1.0
    assert rouge_l("The cat, sat.", ["the cat sat"]) == 1.0  # lowercased, punctuation dropped
    assert rouge_l("red green blue", ["one two three"]) == 0.0
    assert rouge_l("red green blue", []) == 0.0
    prediction = "the quick brown fox jumps over the dog"
    reference = "the brown dog jumps over a lazy fox today"
    lcs = lcs_length(prediction.split(), reference.split())
    precision, recall = lcs / len(prediction.split()), lcs / len(reference.split())
    expected = 2 * precision * recall / (precision + recall)
    assert lcs == 4 and 0 < expected < 1
    assert rouge_l(prediction, [reference]) == pytest.approx(expected)
    assert rouge_l(prediction, ["nothing in common", reference, "quick"]) == pytest.approx(expected)
    assert rouge_l(prediction, [reference, prediction]) == 1.0


# ---------------------------------------------------------------- generation

def prompts_of(data: PreparedData, n: int) -> list[np.ndarray]:
    return [e.input_ids[: e.prompt_length] for e in data.rows(0, n)]


def naive_greedy(model, prompt, steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache, no padding)."""
    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    for _ in range(steps):
        with torch.no_grad():
            token = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], 1)
    return ids[0, len(prompt):].tolist()


def test_left_padded_batches_generate_what_each_prompt_generates_alone(test_split, lively_student_dir):
    model = cpu_model(lively_student_dir)
    prompts = prompts_of(test_split, 5)
    prompts.append(prompts[0][:4])  # mostly padding in a batch with the others
    assert len({len(p) for p in prompts}) > 2
    alone = [generate_ids(model, [p], set(), 0, 8)[0] for p in prompts]
    assert generate_ids(model, prompts, set(), 0, 8) == alone
    assert len({tuple(a) for a in alone}) == len(prompts)  # the output depends on the prompt
    assert [naive_greedy(model, p, 8) for p in prompts[:2]] == alone[:2]
    tokenizer = load_tokenizer(lively_student_dir)
    stops = stop_token_ids(tokenizer, model)
    texts = [tokenizer.decode(generate_ids(model, [p], stops, 0, 8)[0], skip_special_tokens=True).strip()
             for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4) == texts


def test_generation_stops_at_the_end_of_turn_token(tmp_path, test_split, tokenizer_dir):
    model = cpu_model(fixtures.make_student(tmp_path / "m", tokenizer_dir, initializer_range=0.5,
                                            tie_word_embeddings=False))
    tokenizer = load_tokenizer(tmp_path / "m")
    prompt, other = prompts_of(test_split, 2)
    free = generate_ids(model, [prompt], set(), 0, 6)[0]
    assert END_OF_TURN < free[2] and free[2] not in free[:2]
    # <|im_end|> now scores exactly like the third free token: greedy picks it there (lowest id on ties).
    with torch.no_grad():
        model.lm_head.weight[END_OF_TURN] = model.lm_head.weight[free[2]]
    stops = stop_token_ids(tokenizer, model)
    assert END_OF_TURN in stops
    assert generate_ids(model, [prompt], set(), 0, 6)[0][:3] == free[:2] + [END_OF_TURN]
    assert generate_ids(model, [prompt], stops, 0, 6)[0] == free[:2]
    texts = generate(model, tokenizer, [prompt, other], max_new_tokens=6, batch_size=2)
    assert texts[0] == tokenizer.decode(free[:2], skip_special_tokens=True).strip()

    # The end-of-turn token comes from the chat template even when eos is another token.
    other_eos = AutoTokenizer.from_pretrained(tokenizer_dir, eos_token="<|endoftext|>")
    model.generation_config.eos_token_id = None
    assert stop_token_ids(other_eos, model) == {other_eos.convert_tokens_to_ids("<|endoftext|>"), END_OF_TURN}


def test_sampling_is_seeded_per_prompt(test_split, lively_student_dir):
    model = cpu_model(lively_student_dir)
    tokenizer = load_tokenizer(lively_student_dir)
    prompts = prompts_of(test_split, 6)

    def sample(**settings):
        return generate(model, tokenizer, prompts, max_new_tokens=8, do_sample=True, **settings)

    first = sample(seed=1, batch_size=4)
    assert first == sample(seed=1, batch_size=1)  # a prompt's draw does not depend on its batch
    assert first != sample(seed=2, batch_size=4)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert first != greedy
    assert sample(seed=1, top_p=1e-6) == greedy  # a vanishing nucleus keeps only the top token


# ---------------------------------------------------------------- KL to a teacher cache

def test_cache_kl_is_zero_for_the_teacher_itself(full_cache, test_split, moe_dir, lively_student_dir):
    teacher = cpu_model(moe_dir("mixtral"))
    own = cache_kl(teacher, full_cache, batch_size=3)
    assert own["rows"] == len(test_split) and own["tokens"] == test_split.meta["response_tokens"]
    # Not exactly 0: float16 log-probs leave a tail residue of up to ~1e-4 that the empty student tail
    # (every id is cached) prices at log(1e-4 / tiny), ~1e-3 nats in all.
    assert 0 <= own["kl"] < 1e-2
    student = cache_kl(cpu_model(lively_student_dir), full_cache)
    assert student["tokens"] == own["tokens"] and student["kl"] > 100 * own["kl"] + 1


def test_cache_kl_averages_the_samples_over_the_first_rows(tmp_path, test_split, moe_dir, student_dir):
    routing = RoutingConfig(mode="ka", samples=2, lam=0.5)
    cache = make_cache(tmp_path / "ka", cpu_model(moe_dir("mixtral")), test_split, k=16, routing=routing)
    model = cpu_model(student_dir)
    records = [r for index in range(2) for r in read_shard(fixtures.shard_file(cache, index))][:5]
    assert len(records) == 5 and not np.array_equal(records[0].topk_ids[0], records[0].topk_ids[1])
    total = 0.0
    for record in records:  # each sequence alone, through the model's own logits
        with torch.no_grad():
            logits = model(torch.from_numpy(record.input_ids.astype(np.int64))[None]).logits[0]
        student = torch.log_softmax(logits[torch.from_numpy(record.positions).long()], -1)
        per_sample = [sparse_divergence(student, torch.from_numpy(ids), torch.from_numpy(lps), LossConfig())
                      for ids, lps in zip(record.topk_ids, record.topk_logprobs)]
        total += sum(per_sample).sum().item() / len(per_sample)
    tokens = sum(len(r.positions) for r in records)
    result = cache_kl(model, cache, max_rows=5, batch_size=2)
    assert (result["rows"], result["tokens"]) == (5, tokens)
    assert result["kl"] == pytest.approx(total / tokens, rel=1e-4)


def test_cache_kl_refuses_a_cache_missing_a_shard_or_holding_a_record_it_cannot_trust(tmp_path, full_cache,
                                                                                    student_dir):
    partial = Path(shutil.copytree(full_cache, tmp_path / "partial"))
    (partial / "commits" / "shard-00002.json").unlink()  # as if its writer was killed before committing it
    model = cpu_model(student_dir)
    with pytest.raises(MoekdError, match=r"is incomplete: 4 of 5 shards committed; 1 missing \(2\)"):
        cache_kl(model, partial)
    with pytest.raises(MoekdError, match=r"is incomplete"):
        cache_kl(model, partial, max_rows=4)  # even where the rows asked for are all there: the cache is broken
    record = json.loads((full_cache / "commits" / "shard-00002.json").read_text()) | {"rows": 5}
    (partial / "commits" / "shard-00002.json").write_text(json.dumps(record))
    with pytest.raises(MoekdError, match="says shard 2 has 5 rows, but the identity's rows and shard_size give it 4"):
        cache_kl(model, partial)


# ---------------------------------------------------------------- the stage

def table_rows(markdown: str, title: str) -> dict[tuple[str, str], list[str]]:
    """{(split, source): cells after the examples column} of the table under `## title`."""
    section = markdown.split(f"## {title}")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines()[4:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0], cells[1]] = cells[2:]
    return rows


def test_cli_compares_models_per_source_and_reuses_results(
    tmp_path, test_split, extra_split, full_cache, moe_dir, lively_student_dir, capsys, monkeypatch
):
    out = tmp_path / "eval"
    models = f"models={{teacher: {moe_dir('mixtral')}, student: {lively_student_dir}}}"
    data = f"data=[{test_split.directory}, {extra_split.directory}]"

    def args(max_new_tokens=4, *extra):
        return ["eval", "--config", str(EXAMPLE_CONFIG), models, data, "--output", str(out), "--cache",
                str(full_cache), "--max-examples", "10", "--max-new-tokens", str(max_new_tokens), "--batch-size", "4",
                "--device", "cpu", "--dtype", "float32", *extra]

    assert main(args()) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert markdown in printed and "reusing" not in printed

    assert [m["name"] for m in results["models"]] == ["teacher", "student"]
    assert [d["name"] for d in results["data"]] == ["test", "extra"]
    teacher, student = results["models"]
    # rows 0, 2, 4, ... of tasks taken in turn; sources are listed in order of first appearance
    expected_sources = {"test": ["copy", "sort", "first", "reverse", "count"], "extra": ["vicuna"]}
    for model in results["models"]:
        name = model["name"]
        assert set(model["splits"]) == {"test", "extra"}
        for split, sources in expected_sources.items():
            assert set(model["splits"][split]["sources"]) == set(sources)
            assert model["splits"][split]["overall"]["examples"] == (10 if split == "test" else 8)
            rows = [json.loads(line) for line in (out / "predictions" / name / f"{split}.jsonl").open()]
            assert len(rows) == model["splits"][split]["overall"]["examples"]
            for row in rows:
                assert row["rougeL"] == pytest.approx(100 * rouge_l(row["prediction"], row["references"]))
                assert row["exact"] == 100 * exact_match(row["prediction"], row["references"])
            for key in ("rougeL", "exact"):
                mean = sum(r[key] for r in rows) / len(rows)
                assert model["splits"][split]["overall"][key] == pytest.approx(mean)
        assert model["overall"]["examples"] == 18
    assert teacher["kl"]["kl"] < 1e-2 < 1 < student["kl"]["kl"]
    # The cache's split (test) has per-example KL, and its cross-entropy comes from the KL pass: the same
    # numbers as the loss pass over the prepared rows.
    rows = [json.loads(line) for line in (out / "predictions" / "student" / "test.jsonl").open()]
    assert all(row["kl_tokens"] == row["tokens"] and row["kl_sum"] > 0 for row in rows)
    examples = select_examples(test_split, 10)
    losses = example_losses(cpu_model(lively_student_dir), examples, batch_size=4)
    assert [row["nll"] for row in rows] == pytest.approx([nll for nll, _ in losses], rel=1e-5)
    assert not any("kl_sum" in json.loads(line) for line in (out / "predictions" / "student" / "extra.jsonl").open())

    header = "| split | source | examples | teacher | student |"
    assert markdown.count(header) == 4  # exact match, ROUGE-L, perplexity, loss
    rouge = table_rows(markdown, "ROUGE-L")
    loss = table_rows(markdown, "Cross-entropy")
    rows = [(split, source) for split, sources in expected_sources.items() for source in sources + ["**all**"]]
    assert list(rouge) == list(loss) == rows + [("**overall**", "")]
    assert rouge["**overall**", ""] == ["18"] + [f"{m['overall']['rougeL']:.2f}" for m in results["models"]]
    counts = [m["splits"]["test"]["sources"]["count"] for m in results["models"]]
    assert loss["test", "count"] == [str(counts[0]["examples"])] + [f"{c['loss']:.4f}" for c in counts]
    assert "KL(teacher" in markdown

    # The same models, data and settings: nothing is loaded, the results are the same.
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded although its results were stored")

    monkeypatch.setattr(stages.eval, "load_model", no_loading)
    assert main(args()) == 0
    assert capsys.readouterr().out.count("reusing") == 6  # 2 models x (2 splits + KL)
    assert json.loads((out / "results.json").read_text()) == results
    monkeypatch.undo()

    # Another generation length: loss and generation are redone, the KL is reused.
    assert main(args(3)) == 0
    printed = capsys.readouterr().out
    assert printed.count("KL: reusing") == 2 and "on test: reusing" not in printed
    # overwrite recomputes everything, with the same numbers.
    assert main(args(4, "--overwrite")) == 0
    assert "reusing" not in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    for before, after in zip(results["models"], again["models"]):
        assert after["overall"]["loss"] == pytest.approx(before["overall"]["loss"])
        assert after["overall"]["rougeL"] == before["overall"]["rougeL"]


def test_loss_only_run(tmp_path, test_split, student_dir):
    results = run(Config(models={"s": str(student_dir)}, data=[str(test_split.directory)], output=str(tmp_path),
                         generate=False, max_examples=5))
    (model,) = results["models"]
    assert model["overall"]["examples"] == 5 and "rougeL" not in model["overall"] and model["kl"] is None
    assert "ROUGE-L" not in (tmp_path / "results.md").read_text()


def test_a_model_with_another_tokenizer_is_refused(tmp_path, test_split, student_dir, tokenizer_dir):
    other = tmp_path / "other"
    shutil.copytree(student_dir, other)
    AutoTokenizer.from_pretrained(tokenizer_dir, eos_token="<|endoftext|>").save_pretrained(other)
    config = Config(models={"student": str(student_dir), "other eos": str(other)}, data=[str(test_split.directory)],
                    output=str(tmp_path / "out"))
    with pytest.raises(MoekdError, match=f"model 'other eos' \\({other}\\) has a tokenizer .* other than the one "
                                         f"{test_split.directory} was made with"):
        run(config)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("override, message", [
    ("models={}", "models is empty"),
    ("data=[]", "data is empty"),
    ("max_examples=0", "max_examples must be a positive number"),
    ("do_sample=true temperature=0", "sampling needs temperature > 0"),
])
def test_config_mistakes_are_named(tmp_path, test_split, student_dir, capsys, override, message):
    args = ["eval", f"models={{s: {student_dir}}}", f"data=[{test_split.directory}]", f"output={tmp_path}"]
    assert main(args + override.split()) == 2
    assert message in capsys.readouterr().err


def test_exact_match_ignores_case_spacing_and_a_final_full_stop():
    assert exact_match("  Washington,  D.C.", ["washington, d.c."]) == 1.0
    assert exact_match("Paris", ["Lyon", "paris"]) == 1.0
    assert exact_match("Paris is the capital", ["Paris"]) == 0.0
    assert exact_match("", ["x"]) == 0.0 and exact_match("x", []) == 0.0
