"""Loading models/tokenizers from local dirs, dtype/device choice, and the identities."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, T5Config

from pipeline.core.errors import MoekdError
from pipeline.core.processes import resolve_device
from pipeline.models.identity import model_identity, tokenizer_fingerprint, weights_fingerprint
from pipeline.models.loading import load_model, load_tokenizer, resolve_dtype


def test_dtype_and_device_choice():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(MoekdError, match="dtype 'int8' is not one of auto"):
        resolve_dtype("int8", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MoekdError, match="device 'gpu0' is not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MoekdError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_tokenizer_errors_are_clear(tmp_path, moe_dir):
    with pytest.raises(MoekdError, match=f"tokenizer directory not found: {tmp_path / 'nope'}"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(MoekdError, match="tokenizer directory not found"):
        load_tokenizer(moe_dir() / "model.safetensors")  # a file, not a directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoekdError, match="does not hold a usable tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_load_model_in_dtype_eval_mode(moe_dir):
    model = load_model(moe_dir("mixtral"), dtype="bfloat16", device=torch.device("cpu"))
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.model_type == "mixtral"


def test_load_model_errors_are_clear(tmp_path, moe_dir):
    with pytest.raises(MoekdError, match="model directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoekdError, match="has no config.json"):
        load_model(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(moe_dir() / "config.json", no_weights / "config.json")
    with pytest.raises(MoekdError, match=r"cannot load a causal language model from .*no_weights: .*model.safetensors"):
        load_model(no_weights)
    T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    with pytest.raises(MoekdError, match="cannot load a causal language model .*T5Config") as error:
        load_model(tmp_path / "t5")
    assert "\n" not in str(error.value)  # not transformers' list of every causal LM class


def test_tokenizer_fingerprint_stable_and_discriminating(tmp_path, tokenizer_dir):
    first = load_tokenizer(tokenizer_dir)
    fingerprint = tokenizer_fingerprint(first)
    first("a longer text to cut short", truncation=True, max_length=3, padding="max_length")
    assert tokenizer_fingerprint(first) == fingerprint  # using it does not change it
    assert tokenizer_fingerprint(load_tokenizer(tokenizer_dir)) == fingerprint

    first.chat_template = None
    first.save_pretrained(tmp_path / "no_template")
    second = load_tokenizer(tokenizer_dir)
    second.add_tokens(["<|new_token|>"])
    second.save_pretrained(tmp_path / "more_tokens")
    others = {tokenizer_fingerprint(load_tokenizer(tmp_path / d)) for d in ("no_template", "more_tokens")}
    assert len(others) == 2 and fingerprint not in others


def copy_with_changed_weight(source, target):
    """A copy of a model directory with one weight element changed."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_model_identity(tmp_path, moe_dir):
    path = moe_dir("mixtral")
    identity = model_identity(path, load_model(path))
    assert identity == model_identity(path, AutoConfig.from_pretrained(path))  # config alone suffices
    assert identity == model_identity(path, load_model(path, dtype="bfloat16"))  # load dtype is not identity
    assert identity["model_type"] == "mixtral" and identity["vocab_size"] == 384
    assert identity["name"] == path.name

    changed = copy_with_changed_weight(path, tmp_path / "changed")
    other = model_identity(changed, AutoConfig.from_pretrained(changed))
    assert other["config_hash"] == identity["config_hash"]
    assert other["weights_fingerprint"] != identity["weights_fingerprint"]

    bigger = tmp_path / "bigger"
    shutil.copytree(path, bigger)
    config = json.loads((bigger / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert model_identity(bigger, AutoConfig.from_pretrained(bigger))["config_hash"] != identity["config_hash"]


def test_weights_fingerprint_of_large_files_samples_header_and_ranges(tmp_path, moe_dir):
    path = shutil.copytree(moe_dir("mixtral"), tmp_path / "model")
    sampled = weights_fingerprint(path, full_hash_below=0)  # treat the tiny file as a large one
    assert sampled != weights_fingerprint(path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last sampled range ends at the last byte
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(path, full_hash_below=0) != sampled
    # Every tensor is sampled: a change to one small tensor in the middle of the file is seen.
    before = weights_fingerprint(path, full_hash_below=0)
    with safe_open(weights, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    assert weights_fingerprint(path, full_hash_below=0) != before
    (path / "model.safetensors").unlink()
    with pytest.raises(MoekdError, match="holds no \\*.safetensors or \\*.bin weight files"):
        weights_fingerprint(path)
