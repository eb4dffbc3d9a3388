"""`moekd prepare` and the prepared-data reader, on the fixture tokenizer and instruction data."""

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fixtures
import pipeline.data.prepared
from pipeline.core.errors import MoekdError
from pipeline.data.batch import collate_examples
from pipeline.data.prepared import PreparedData, target_positions
from pipeline.data.template import PLAIN_TEMPLATE, PLAIN_TEMPLATE_NO_CONTEXT
from stages.cli import main
from stages.prepare import Config, run

EXAMPLE_CONFIG = Path(__file__).parent.parent / "configs" / "prepare.yaml"


@pytest.fixture(scope="module")
def records():
    rows = fixtures.instruction_records(24)
    rows[1]["context"] = ""  # one record without context
    return rows


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory, tokenizer_dir):
    """The fixture tokenizer without its chat template."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    directory = tmp_path_factory.mktemp("plain_tokenizer")
    tok.save_pretrained(directory)
    return directory


def prepare(inputs, output, tokenizer_dir, **settings) -> PreparedData:
    run(Config(inputs=[str(p) for p in inputs], output=str(output), tokenizer=str(tokenizer_dir), **settings))
    return PreparedData(output)


def all_rows(data: PreparedData):
    return data.rows(0, len(data))


def user_message(record):
    return f"{record['instruction']}\n\n{record['context']}" if record["context"] else record["instruction"]


def test_chat_template_masks_exactly_the_assistant_reply(tmp_path, tokenizer_dir, tokenizer, records):
    data = prepare([fixtures.write_jsonl(tmp_path / "dolly.jsonl", records)], tmp_path / "out", tokenizer_dir)
    rows = all_rows(data)
    assert len(rows) == len(records) == data.meta["rows"]
    for row, record in zip(rows, records):
        messages = [{"role": "user", "content": user_message(record)}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(row.input_ids[: row.prompt_length]) == prompt
        assert tokenizer.decode(row.input_ids[row.response_mask]) == record["response"] + "<|im_end|>"
        assert list(row.response_mask) == [t >= row.prompt_length for t in range(len(row.input_ids))]
        assert row.input_ids.dtype == np.int32 and row.response_mask.dtype == np.bool_
        assert row.references == [record["response"]] and row.source == "dolly"
    assert data.meta["tokens"] == sum(len(r.input_ids) for r in rows)
    assert data.meta["response_tokens"] == sum(int(r.response_mask.sum()) for r in rows)
    assert data.meta["skipped"] == {}


def test_plain_template_without_chat_template(tmp_path, plain_tokenizer_dir, tokenizer, records):
    data = prepare([fixtures.write_jsonl(tmp_path / "d.jsonl", records)], tmp_path / "out", plain_tokenizer_dir)
    for row, record in zip(all_rows(data), records):
        template = PLAIN_TEMPLATE if record["context"] else PLAIN_TEMPLATE_NO_CONTEXT
        assert tokenizer.decode(row.input_ids[: row.prompt_length]) == template.format(**record)
        assert tokenizer.decode(row.input_ids[row.response_mask]) == record["response"] + tokenizer.eos_token


def test_format_string_template(tmp_path, tokenizer_dir, tokenizer, records):
    template = "Task: {instruction}\nWords: {context}\nAnswer:"
    data = prepare([fixtures.write_jsonl(tmp_path / "d.jsonl", records)], tmp_path / "out", tokenizer_dir,
                   template=template)
    for row, record in zip(all_rows(data), records):
        assert tokenizer.decode(row.input_ids[: row.prompt_length]) == template.format(**record)
        assert tokenizer.decode(row.input_ids[row.response_mask]) == record["response"] + "<|im_end|>"
    for bad in ("chatml", "{instruction} {answer}"):
        with pytest.raises(MoekdError, match="template"):
            prepare([tmp_path / "d.jsonl"], tmp_path / "bad", tokenizer_dir, template=bad)


def write_json_list(path, records):
    path.write_text(json.dumps(records))


def write_json_data(path, records):
    path.write_text(json.dumps({"data": records}))


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)


def write_csv(path, records):
    datasets.Dataset.from_list(records).to_csv(path, index=False)


def write_data_dir(path, records):
    path.mkdir()
    fixtures.write_jsonl(path / "part-0.jsonl", records[:10])
    fixtures.write_jsonl(path / "part-1.jsonl", records[10:])


def write_saved_dataset(path, records):
    datasets.Dataset.from_list(records).save_to_disk(path)


@pytest.mark.parametrize("name, write", [
    ("dolly.json", write_json_list), ("dolly.json", write_json_data), ("dolly.parquet", write_parquet),
    ("dolly.csv", write_csv), ("dolly", write_data_dir), ("dolly", write_saved_dataset),
])
def test_input_formats_give_the_same_rows(tmp_path, tokenizer_dir, records, name, write):
    reference = all_rows(prepare([fixtures.write_jsonl(tmp_path / "dolly.jsonl", records)], tmp_path / "ref",
                                 tokenizer_dir))
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / name, records)
    rows = all_rows(prepare([tmp_path / "in" / name], tmp_path / "out", tokenizer_dir))
    assert [r.input_ids.tolist() for r in rows] == [r.input_ids.tolist() for r in reference]
    assert [r.response_mask.tolist() for r in rows] == [r.response_mask.tolist() for r in reference]
    assert [(r.references, r.source) for r in rows] == [(r.references, r.source) for r in reference]


def test_null_cells_count_as_missing(tmp_path, tokenizer_dir):
    table = [{"instruction": "Say hi", "context": None, "response": "hi"},
             {"instruction": None, "context": None, "response": "hi"}]
    write_parquet(tmp_path / "nulls.parquet", table)
    data = prepare([tmp_path / "nulls.parquet"], tmp_path / "out", tokenizer_dir)
    assert len(data) == 1 and data.meta["skipped"] == {"missing_field": 1}


@pytest.mark.parametrize("name, content, message", [
    ("latin1.csv", b"instruction,response\ncaf\xe9,x\n", "cannot read .*latin1.csv with the datasets library"),
    ("broken.parquet", b"PAR1 not really", "broken.parquet is not a readable Parquet file"),
    ("notes.xyz", b"instruction response", "cannot read .*notes.xyz with the datasets library"),
    ("dict.json", b'{"rows": []}', 'dict.json must hold a JSON list of records or an object with a "data" list'),
])
def test_unreadable_inputs_are_clear_errors(tmp_path, tokenizer_dir, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MoekdError, match=message):
        prepare([tmp_path / name], tmp_path / "out", tokenizer_dir)


def test_saved_dataset_with_several_splits_is_refused(tmp_path, tokenizer_dir, records):
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(records[:4]), "test": datasets.Dataset.from_list(records[4:])
    })
    splits.save_to_disk(tmp_path / "splits")
    with pytest.raises(MoekdError, match=r"several splits \(train, test\)"):
        prepare([tmp_path / "splits"], tmp_path / "out", tokenizer_dir)


def test_custom_fields_references_and_source(tmp_path, tokenizer_dir, tokenizer):
    rows_in = [
        {"prompt": "Repeat the words.", "input": "a b", "output": "a b", "refs": ["a b", "a  b"], "task": "copy"},
        {"prompt": "Count the words.", "output": "2", "refs": "two"},  # no context, no task, one reference
    ]
    data = prepare(
        [fixtures.write_jsonl(tmp_path / "mixed.jsonl", rows_in)], tmp_path / "out", tokenizer_dir,
        instruction_field="prompt", context_field="input", response_field="output",
        references_field="refs", source_field="task",
    )
    first, second = all_rows(data)
    assert first.references == ["a b", "a  b"] and first.source == "copy"
    assert second.references == ["2", "two"] and second.source == "mixed"
    assert tokenizer.decode(second.input_ids[: second.prompt_length]).endswith(
        "user\nCount the words.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_skip_truncation_cuts_on_the_right_and_skips_long_prompts(tmp_path, tokenizer_dir, records):
    path = fixtures.write_jsonl(tmp_path / "d.jsonl", records)
    full = all_rows(prepare([path], tmp_path / "full", tokenizer_dir))
    max_length = 38
    expected = [r for r in full if r.prompt_length < max_length]
    assert 0 < len(expected) < len(full)  # the data exercises both outcomes
    assert any(len(r.input_ids) > max_length for r in expected)
    cut = prepare([path], tmp_path / "cut", tokenizer_dir, max_length=max_length, truncation="skip")
    assert cut.meta["skipped"] == {"prompt_too_long": len(full) - len(expected)}
    assert cut.meta["truncated"]["prompt_truncated"] == 0
    for row, whole in zip(all_rows(cut), expected):
        assert row.input_ids.tolist() == whole.input_ids[:max_length].tolist()
        assert row.response_mask.tolist() == whole.response_mask[:max_length].tolist()
        assert row.prompt_length == whole.prompt_length


def test_left_truncation_keeps_every_response_and_the_end_of_its_prompt(tmp_path, tokenizer_dir, records):
    long_records = [dict(r, context=" ".join([r["context"]] * 4)) for r in records]  # prompts beyond max_length
    long_records[0]["response"] = " ".join(["word"] * 40)  # a response longer than max_length itself
    path = fixtures.write_jsonl(tmp_path / "d.jsonl", long_records)
    full = all_rows(prepare([path], tmp_path / "full", tokenizer_dir))
    max_length = 38
    cut = prepare([path], tmp_path / "cut", tokenizer_dir, max_length=max_length)
    assert len(cut) == len(full) and cut.meta["skipped"] == {}  # nothing lost
    prompts_cut = responses_cut = 0
    for row, whole in zip(all_rows(cut), full):
        assert len(row.input_ids) == min(len(whole.input_ids), max_length)
        prompt, response = whole.input_ids[: whole.prompt_length], whole.input_ids[whole.prompt_length :]
        kept_prompt, kept_response = row.input_ids[: row.prompt_length], row.input_ids[row.prompt_length :]
        assert prompt.tolist()[len(prompt) - len(kept_prompt) :] == kept_prompt.tolist()  # the prompt's end
        assert response.tolist()[: len(kept_response)] == kept_response.tolist()
        assert row.response_mask.tolist() == [i >= row.prompt_length for i in range(len(row.input_ids))]
        if len(kept_response) < len(response):  # only a response that cannot fit beside half a prompt is cut
            assert row.prompt_length == max_length // 2
            responses_cut += 1
        elif len(whole.input_ids) > max_length:
            assert len(kept_response) == len(response)
            prompts_cut += 1
    assert responses_cut == 1 and prompts_cut > len(full) // 2
    assert cut.meta["truncated"] == {"prompt_truncated": prompts_cut + responses_cut, "response_truncated": 1}


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer_dir, records, capsys):
    good = [json.dumps(r).encode() for r in records[:3]]
    lines = [
        good[0],
        b'{"instruction": "caf\xe9", "response": "x"}',  # latin-1, not UTF-8
        b'{"instruction": "Say hi", "response": ',  # malformed JSON
        b'{"instruction": "Say hi", "response": "x", "n": ' + b"9" * 5000 + b"}",  # past Python's int limit
        json.dumps({"instruction": "Say hi", "response": "  "}).encode(),  # empty response
        json.dumps({"instruction": "Say hi"}).encode(),  # missing response
        good[1],
        json.dumps({"instruction": "Say hi", "response": 5}).encode(),  # not a string
        json.dumps({"instruction": "Say hi", "response": "hi", "references": [1]}).encode(),
        b"[1, 2]",  # valid JSON, not a record
        b"",  # blank lines are not records
        good[2],
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = prepare([path], tmp_path / "out", tokenizer_dir)
    assert [r.references[0] for r in all_rows(data)] == [r["response"] for r in records[:3]]
    assert data.meta["skipped"] == {
        "empty_field": 1, "invalid_utf8": 1, "malformed_json": 2, "missing_field": 1, "not_a_record": 1,
        "not_string": 2,
    }
    summary = capsys.readouterr().out
    assert "3 rows" in summary and "invalid_utf8=1" in summary and "not_string=2" in summary


def test_nothing_valid_is_a_clear_error(tmp_path, tokenizer_dir):
    path = fixtures.write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(MoekdError, match=r"no usable records in .*wrong.jsonl \(skipped: missing_field=3; not selected: 0\)"):
        prepare([path], tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not (tmp_path / "out" / "data.parquet").exists()
    with pytest.raises(MoekdError, match=f"input not found: {tmp_path / 'missing.jsonl'}"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "out", tokenizer_dir)


def test_fingerprint_covers_tokenizer_template_length_data_and_limit(
    tmp_path, tokenizer_dir, plain_tokenizer_dir, records
):
    path = fixtures.write_jsonl(tmp_path / "a" / "d.jsonl", records)
    edited = [dict(records[0], response=records[0]["response"] + "!"), *records[1:]]
    edited_path = fixtures.write_jsonl(tmp_path / "b" / "d.jsonl", edited)

    def fingerprint(name, inputs=(path,), tok=tokenizer_dir, **settings):
        return prepare(list(inputs), tmp_path / name, tok, **settings).fingerprint

    base = fingerprint("base")
    assert fingerprint("again") == base
    variants = [
        fingerprint("tokenizer", tok=plain_tokenizer_dir),
        fingerprint("template", template="{instruction}\n{context}\n"),
        fingerprint("length", max_length=100),
        fingerprint("truncation", truncation="skip"),
        fingerprint("data", inputs=(edited_path,)),
        fingerprint("limit", limit=5),
        fingerprint("fields", source_field="task"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert len(PreparedData(tmp_path / "limit")) == 5


def test_rerun_is_a_noop_different_settings_need_overwrite(tmp_path, tokenizer_dir, records, capsys):
    path = fixtures.write_jsonl(tmp_path / "d.jsonl", records)
    first = prepare([path], tmp_path / "out", tokenizer_dir)
    data_file = tmp_path / "out" / "data.parquet"
    before = os.stat(data_file)
    prepare([path], tmp_path / "out", tokenizer_dir)
    assert "up to date" in capsys.readouterr().out
    after = os.stat(data_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    with pytest.raises(MoekdError, match="already holds prepared data .* use --overwrite"):
        prepare([path], tmp_path / "out", tokenizer_dir, max_length=30)
    assert PreparedData(tmp_path / "out").fingerprint == first.fingerprint  # untouched
    redone = prepare([path], tmp_path / "out", tokenizer_dir, max_length=30, overwrite=True)
    assert redone.fingerprint != first.fingerprint
    assert max(len(r.input_ids) for r in all_rows(redone)) == 30


def test_prepared_data_reader_errors(tmp_path, tokenizer_dir, records):
    with pytest.raises(MoekdError, match="prepared data not found"):
        PreparedData(tmp_path / "nowhere")
    out = tmp_path / "out"
    prepare([fixtures.write_jsonl(tmp_path / "d.jsonl", records)], out, tokenizer_dir)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "rows": meta["rows"] + 1}))
    with pytest.raises(MoekdError, match="rows but meta.json says"):
        PreparedData(out)
    (out / "meta.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(MoekdError, match="is not moekd prepared data"):
        PreparedData(out)
    (out / "meta.json").unlink()
    with pytest.raises(MoekdError, match="is incomplete"):
        PreparedData(out)
    # An incomplete directory is simply prepared again, no --overwrite needed.
    assert len(prepare([tmp_path / "d.jsonl"], out, tokenizer_dir)) == len(records)


def test_rows_slices_across_row_groups(tmp_path, tokenizer_dir, records, monkeypatch):
    monkeypatch.setattr(pipeline.data.prepared, "ROW_GROUP_SIZE", 5)
    data = prepare([fixtures.write_jsonl(tmp_path / "d.jsonl", records)], tmp_path / "out", tokenizer_dir)
    assert data.file.num_row_groups == 5
    table = pq.read_table(tmp_path / "out" / "data.parquet").to_pylist()
    for start, stop in [(0, 24), (3, 13), (5, 10), (9, 11), (20, 100), (7, 7)]:
        rows = data.rows(start, stop)
        expected = table[start:stop]
        assert [r.seq_id for r in rows] == list(range(start, min(stop, 24)))
        assert [r.input_ids.tolist() for r in rows] == [e["input_ids"] for e in expected]
        assert [r.response_mask.tolist() for r in rows] == [e["response_mask"] for e in expected]
        assert [r.prompt_length for r in rows] == [e["prompt_length"] for e in expected]


def test_batch_targets_match_target_positions(tmp_path, tokenizer_dir, student_dir, records):
    data = prepare([fixtures.write_jsonl(tmp_path / "d.jsonl", records)], tmp_path / "out", tokenizer_dir)
    examples = data.rows(0, 4)
    batch = collate_examples(examples, pad_id=0)
    longest = max(len(e.input_ids) for e in examples)
    assert batch.input_ids.shape == batch.attention_mask.shape == (4, longest)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    batch_loss = torch.nn.functional.cross_entropy(logits[batch.rows, batch.cols], batch.targets)
    # The same loss by hand: logits at each target position t against token t + 1.
    losses = []
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (longest - n)
        assert (batch.input_ids[i, n:] == 0).all()
        positions = torch.from_numpy(target_positions(e.response_mask))
        assert (positions + 1).tolist() == np.flatnonzero(e.response_mask).tolist()
        assert batch.cols[batch.rows == i].tolist() == positions.tolist()
        targets = torch.from_numpy(e.input_ids[positions + 1].astype(np.int64))
        losses.append(torch.nn.functional.cross_entropy(logits[i, positions], targets, reduction="none"))
    assert torch.allclose(batch_loss, torch.cat(losses).mean(), atol=1e-5)


def test_cli_end_to_end_with_the_example_config(tmp_path, tokenizer_dir, instructions_jsonl, capsys):
    out = tmp_path / "out"
    args = ["prepare", "--config", str(EXAMPLE_CONFIG), f"inputs=[{instructions_jsonl}]", "--output", str(out),
            "--tokenizer", str(tokenizer_dir)]
    assert main(args + ["--max-length", "64", "--limit", "10"]) == 0
    data = PreparedData(out)
    assert len(data) == 10 and data.meta["config"]["max_length"] == 64
    assert main(args + ["--max-length", "64", "--limit", "10"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(args + ["--max-length", "32"]) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert main(args + ["inputs=[]"]) == 2
    assert "inputs is empty" in capsys.readouterr().err
