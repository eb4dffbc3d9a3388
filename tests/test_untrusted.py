"""Data from another team is untrusted: caches stay confined and checked, nothing runs code, runs do not collide.

One group of tests per class of failure: a cache leading outside itself, readers trusting what they read,
code arriving with a checkpoint or a model, runs colliding or drifting, non-finite settings and edge inputs.
"""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import pytest
import torch

import fixtures
from pipeline.cache_format import Manifest, verify_cache
from pipeline.cli import main
from pipeline.config import config_hash
from pipeline.errors import MoekdError
from pipeline.files import FileLock
from pipeline.models import REMOTE_CODE, load_model
from pipeline.training import RUN_LOCK, TRAINER_STATE, load_trainer_state
from stages import cache, prepare, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.prepared_records(tmp_path_factory.mktemp("untrusted"), tokenizer_dir, 24, seed=4)


def make_cache(output: Path, teacher: Path, data: Path) -> Path:
    cache.run(cache.Config(output=str(output), teacher=str(teacher), data=str(data), top_k=16, shard_size=8,
                           batch_size=4, device="cpu"))
    return output


@pytest.fixture(scope="module")
def reference(tmp_path_factory, moe_dir, prepared) -> Path:
    return make_cache(tmp_path_factory.mktemp("reference") / "cache", moe_dir("mixtral"), prepared)


@pytest.fixture
def copy(tmp_path, reference) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "cache"))


def edit_manifest(cache_dir: Path, edit) -> None:
    path = cache_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_record(cache_dir: Path, index: int, edit) -> None:
    path = cache_dir / "commits" / f"shard-{index:05d}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def shard_file(cache_dir: Path, index: int) -> Path:
    return cache_dir / Manifest.load(cache_dir).shards[index].file


def moekd(capsys, *args) -> str:
    """Run the CLI, expecting a one-line refusal (exit 2); that line."""
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"moekd {args[0]}: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def commands(cache_dir: Path, student: Path, tmp_path: Path, prepared: Path) -> list[list]:
    """Every command that reads a cache: verify, inspect, train, eval."""
    return [["verify", cache_dir], ["inspect", cache_dir],
            ["train", tmp_path / "run", "--student", student, "--cache", cache_dir, "--device", "cpu"],
            ["eval", "--output", tmp_path / "eval", f"models={{s: {student}}}", f"data=[{prepared}]",
             "--cache", cache_dir, "--no-generate", "--device", "cpu"]]


# ---------------------------------------------------------------- 1. a cache cannot lead outside itself

@pytest.mark.parametrize("file", ["../../outside.parquet", "/tmp/outside.parquet", "shards/../shards/shard-00000.parquet",
                                  "shard 1's"])
def test_a_shard_entry_naming_another_file_is_refused_by_every_reader(tmp_path, copy, student_dir, prepared,
                                                                      file, capsys):
    outside = tmp_path / "outside.parquet"
    shutil.copy(shard_file(copy, 0), outside)  # a valid shard with the matching hash
    file = str(shard_file(copy, 1).relative_to(copy)) if file == "shard 1's" else file
    edit_record(copy, 0, lambda r: r.update(file=file))
    for command in commands(copy, student_dir, tmp_path, prepared):
        assert "record.file is" in moekd(capsys, *command)
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval" / "results.json").exists()


def test_links_inside_a_cache_are_not_followed(tmp_path, copy, student_dir, prepared, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = shard_file(copy, 1)
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)  # same bytes, same hash: only the link is wrong
    assert any("symbolic link" in p for p in verify_cache(copy))
    for command in commands(copy, student_dir, tmp_path, prepared)[2:]:
        assert "symbolic link" in moekd(capsys, *command)


def test_overwriting_a_cache_whose_shard_directory_is_a_link_leaves_the_target_alone(
    tmp_path, copy, moe_dir, prepared,
):
    victim = tmp_path / "victim"
    shutil.copytree(copy / "shards", victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    shutil.rmtree(copy / "shards")
    (copy / "shards").symlink_to(victim)
    with pytest.raises(MoekdError, match="is a symbolic link"):  # resuming into a link is refused
        make_cache(copy, moe_dir("mixtral"), prepared)
    cache.run(cache.Config(output=str(copy), teacher=str(moe_dir("mixtral")), data=str(prepared), top_k=8,
                           shard_size=8, batch_size=4, device="cpu", overwrite=True))
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before  # nothing deleted or written there
    assert not (copy / "shards").is_symlink() and verify_cache(copy) == []


def test_a_lock_file_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "target"
    (tmp_path / "x.lock").symlink_to(target)
    with pytest.raises(MoekdError, match="is a symbolic link"):
        FileLock(tmp_path / "x.lock").try_acquire()
    assert not target.exists()


# ---------------------------------------------------------------- 2. readers check what they read

def test_eval_inspect_and_train_refuse_a_changed_shard(tmp_path, copy, student_dir, prepared, tokenizer_dir, capsys):
    shard = shard_file(copy, 2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    eval_args = ["eval", "--output", tmp_path / "eval", f"models={{s: {student_dir}}}", f"data=[{prepared}]",
                 "--cache", copy, "--no-generate", "--device", "cpu"]
    assert "does not match its commit record" in moekd(capsys, *eval_args)
    assert "does not match its commit record" in moekd(capsys, "inspect", copy, "--seq", 17,
                                                       "--tokenizer", tokenizer_dir)
    with pytest.raises(MoekdError, match="does not match its commit record"):
        Manifest.load(copy).read_shard(2)


def rename_record(cache_dir: Path, index: int, new: int) -> None:
    (cache_dir / "commits" / f"shard-{index:05d}.json").rename(cache_dir / "commits" / f"shard-{new:05d}.json")


@pytest.mark.parametrize("edit, message", [
    (lambda c: edit_manifest(c, lambda m: m.update(identity=[])), "identity must be a JSON object"),
    (lambda c: edit_manifest(c, lambda m: m["identity"].pop("encoding")), "identity.encoding must be an object"),
    (lambda c: edit_manifest(c, lambda m: m["identity"]["encoding"].update(k="64")),
     "identity.encoding.k must be a positive integer"),
    (lambda c: edit_manifest(c, lambda m: m["identity"]["encoding"].update(num_samples=-1)),
     "num_samples must be a positive integer"),
    (lambda c: edit_manifest(c, lambda m: m["identity"].update(num_shards="3")), "identity.num_shards must be a int"),
    (lambda c: edit_record(c, 0, lambda r: r.update(rows=-3)), r"record.rows must be a non-negative integer"),
    (lambda c: edit_record(c, 1, lambda r: r.update(sha256="abc")), r"record.sha256 is not a sha256"),
    (lambda c: edit_record(c, 1, lambda r: r.pop("bytes")), r"record must be an object with exactly"),
    (lambda c: rename_record(c, 1, 7), "is named for shard 7 but describes shard 1"),
    (lambda c: edit_record(c, 1, lambda r: r.update(cache="0" * 64)), "does not belong to this cache"),
])
def test_malformed_manifests_and_records_are_one_line_errors(copy, student_dir, tmp_path, prepared, edit, message,
                                                             capsys):
    edit(copy)
    for command in commands(copy, student_dir, tmp_path, prepared):
        assert re.search(message, moekd(capsys, *command))
    with pytest.raises(MoekdError, match=message):
        Manifest.load(copy)


def test_inspect_shows_what_a_foreign_manifest_lacks_and_follows_no_path_in_it(copy, tokenizer_dir, capsys):
    edit_manifest(copy, lambda m: (m["identity"].pop("teacher"), m["identity"].pop("routing"),
                                   m["info"].update(teacher_path="/etc")))
    foreign = config_hash(json.loads((copy / "manifest.json").read_text())["identity"])
    for index in range(3):  # as the foreign writer committed them
        edit_record(copy, index, lambda r: r.update(cache=foreign))
    assert main(["inspect", str(copy)]) == 0
    assert "teacher    /etc (?, weights ?)" in capsys.readouterr().out
    assert "tokenizer=<the teacher's tokenizer directory>" in moekd(capsys, "inspect", copy, "--seq", 3)
    assert main(["inspect", str(copy), "--seq", "3", "--tokenizer", str(tokenizer_dir)]) == 0
    assert "sequence 3:" in capsys.readouterr().out


# ---------------------------------------------------------------- 3. nothing moekd loads runs code

class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_carrying_code_is_refused_unrun(tmp_path, student_dir, reference):
    run = tmp_path / "run"
    train.run(train.Config(output=str(run), student=str(student_dir), cache=str(reference), max_steps=2,
                           save_every=1, device="cpu", batch_size=4, keep_checkpoints_at_end=True))
    first, last = sorted((run / "checkpoints").iterdir())
    assert load_trainer_state(first)["trainer"]["steps_done"] == 1  # moekd's own checkpoints load safely
    shutil.rmtree(run / "final")
    shutil.rmtree(last)  # as if killed before step 2 was saved: a re-run resumes from step 1
    marker = tmp_path / "marker"
    torch.save(load_trainer_state(first) | {"evil": Payload(marker)}, first / TRAINER_STATE)
    with pytest.raises(MoekdError, match="not a moekd trainer state holding only tensors and plain data"):
        train.run(train.Config(output=str(run), student=str(student_dir), cache=str(reference), max_steps=2,
                               save_every=1, device="cpu", batch_size=4))
    assert not marker.exists()


def custom_code_model(directory: Path, student_dir: Path, marker: Path) -> Path:
    """A model directory whose config asks for its own code (an unregistered model type)."""
    shutil.copytree(student_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config |= {"model_type": "moekd_custom", "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                            "AutoModelForCausalLM": "custom.CustomModel"}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'moekd_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return directory


def test_code_in_a_model_directory_runs_only_when_allowed(tmp_path, student_dir, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "marker"
    model = custom_code_model(tmp_path / "custom", student_dir, marker)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("moekd asked on stdin"))
    with pytest.raises(MoekdError, match="cannot load a causal language model"):
        load_model(model, dtype="float32", device="cpu")
    assert not marker.exists()
    token = REMOTE_CODE.set(True)  # what a stage's trust_remote_code=true does
    try:
        load_model(model, dtype="float32", device="cpu")
    finally:
        REMOTE_CODE.reset(token)
    assert marker.read_text() == "ran"


def test_pickled_weights_are_a_one_line_error(tmp_path, student_dir, prepared, capsys):
    model = Path(shutil.copytree(student_dir, tmp_path / "pickled"))
    marker = tmp_path / "marker"
    weights = load_model(model, dtype="float32", device="cpu").state_dict() | {"evil": Payload(marker)}
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")
    err = moekd(capsys, "eval", "--output", tmp_path / "eval", f"models={{p: {model}}}", f"data=[{prepared}]",
                "--no-generate", "--device", "cpu")
    assert "cannot load a causal language model" in err and not marker.exists()


# ---------------------------------------------------------------- 4. runs neither collide nor drift

def test_a_second_process_on_a_running_run_is_refused(tmp_path, student_dir, reference, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = FileLock(run / RUN_LOCK)
    assert holder.try_acquire()  # as a running `moekd train` holds it
    try:
        err = moekd(capsys, "train", run, "--student", student_dir, "--cache", reference, "--device", "cpu",
                    "max_steps=2")
        assert "in use by another moekd process" in err
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert main(["train", str(run), "--student", str(student_dir), "--cache", str(reference), "--device", "cpu",
                 "max_steps=2"]) == 0


def test_a_run_does_not_resume_against_another_teacher(tmp_path, student_dir, moe_dir, prepared, reference, capsys):
    run, cache_dir = tmp_path / "run", Path(shutil.copytree(reference, tmp_path / "cache"))
    args = ["train", run, "--student", student_dir, "--cache", cache_dir, "--device", "cpu", "max_steps=4",
            "save_every=2", "batch_size=4"]
    assert main(list(map(str, [*args[:-3], "max_steps=2", "save_every=2", "batch_size=4",
                               "keep_checkpoints_at_end=true"]))) == 0
    shutil.rmtree(run / "final")  # as if interrupted after its checkpoint at step 2
    shutil.rmtree(cache_dir)  # the cache is replaced by another teacher's: same tokenizer, same shapes
    other = fixtures.make_moe(tmp_path / "other", "mixtral", moe_dir("mixtral"), seed=7)
    make_cache(cache_dir, other, prepared)
    run_json = json.loads((run / "run.json").read_text())
    run_json["config"]["max_steps"] = 4  # the same settings as the resumed command
    (run / "run.json").write_text(json.dumps(run_json))
    assert "holds a run of other inputs than these: cache is" in moekd(capsys, *args)


# ---------------------------------------------------------------- 5. non-finite settings and edge inputs

def test_a_diverging_run_stops_before_saving_broken_weights(tmp_path, student_dir, reference, capsys):
    run = tmp_path / "run"
    assert "must be a finite number" in moekd(capsys, "train", run, "--student", student_dir, "--cache", reference,
                                              "optim.lr=.inf")
    err = moekd(capsys, "train", run, "--student", student_dir, "--cache", reference, "--device", "cpu",
                "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "max_steps=6", "save_every=1",
                "batch_size=4")
    assert "the step was not taken and nothing of it was saved" in err
    step = int(err.split("step ")[1].split(":")[0])
    saved = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    assert not (run / "final").exists() and max(saved, default=0) < step
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
        assert json.loads(line)["step"] < step


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, student_dir, reference, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(MoekdError, match="could not write checkpoint .* is the disk full"):
        train.run(train.Config(output=str(tmp_path / "run"), student=str(student_dir), cache=str(reference),
                               max_steps=2, save_every=1, device="cpu", batch_size=4))


def test_edge_records_are_skipped_by_reason(tmp_path, tokenizer_dir):
    good = fixtures.instruction_records(3)
    lines = [json.dumps(r) for r in good]
    lines.append('{"instruction": "x\\ud800", "response": "y"}')  # a lone surrogate
    lines.append("[" * 100_000 + "]" * 100_000)  # nested deeper than Python's stack
    lines.append(json.dumps({"instruction": "long " * 100_000, "response": "y"}))  # 500 KB of text
    path = tmp_path / "edge.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prepare.run(prepare.Config(inputs=[str(path)], output=str(tmp_path / "out"), tokenizer=str(tokenizer_dir),
                               max_record_bytes=300_000))
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["rows"] == 3
    assert meta["skipped"] == {"invalid_text": 1, "malformed_json": 1, "record_too_large": 1}


def test_a_dataset_loading_script_is_refused_unrun(tmp_path, tokenizer_dir, capsys):
    directory = tmp_path / "scripted"
    directory.mkdir()
    marker = tmp_path / "marker"
    (directory / "scripted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    err = moekd(capsys, "prepare", f"inputs=[{directory}]", "--output", tmp_path / "out", "--tokenizer", tokenizer_dir)
    assert "cannot read" in err and not marker.exists() and not os.path.exists(tmp_path / "out" / "meta.json")


def test_a_manifest_promising_rows_a_shard_lacks_is_one_line(copy, student_dir, tmp_path, prepared, capsys):
    edit_record(copy, 0, lambda r: r.update(rows=10_000))
    err = moekd(capsys, "eval", "--output", tmp_path / "eval", f"models={{s: {student_dir}}}", f"data=[{prepared}]",
                "--cache", copy, "--no-generate", "--device", "cpu", "kl_max_rows=20")  # the shard holds 8
    assert "cannot read teacher-cache shard" in err
