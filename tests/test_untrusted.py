"""Data from another team is untrusted: caches stay confined and checked, nothing runs code, runs do not collide.

One group of tests per class of failure: a cache leading outside itself, readers trusting what they read,
code arriving with a checkpoint or a model, runs colliding or drifting, checkpoints trusted by their names,
non-finite settings and edge inputs.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import fixtures
from pipeline.cache.manifest import Manifest, verify_cache
from pipeline.core.config import config_hash
from pipeline.core.errors import MoekdError
from pipeline.core.files import FileLock
from pipeline.models.loading import REMOTE_CODE, load_model
from pipeline.student.checkpoints import (
    CHECKPOINT_RECORD, TRAINER_STATE, check_checkpoint, checkpoint_record, load_trainer_state,
)
from pipeline.student.rundir import RUN_LOCK
from stages import cache, prepare, train
from stages.cli import main
from test_files import no_hang

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


# ---------------------------------------------------------------- 2b. a cache is whole, or refused until repaired

def test_a_cache_missing_a_record_is_refused_until_moekd_cache_finishes_it(copy, student_dir, tmp_path, prepared,
                                                                           moe_dir, reference, capsys):
    (copy / "commits" / "shard-00001.json").unlink()  # shard 1's writer was killed before it committed
    verify, inspect, train_, eval_ = commands(copy, student_dir, tmp_path, prepared)
    assert "have no commit record: 1" in moekd(capsys, *verify)
    assert main(list(map(str, inspect))) == 0
    assert "status     incomplete: 1 of the 3 shards the identity announces have no commit record: 1" \
        in capsys.readouterr().out
    for command in (train_, eval_):
        assert "is incomplete: 2 of 3 shards committed; 1 missing (1)" in moekd(capsys, *command)
    make_cache(copy, moe_dir("mixtral"), prepared)
    assert main(["verify", str(copy)]) == 0 and "complete, every shard matches" in capsys.readouterr().out
    assert fixtures.cache_files(copy) == fixtures.cache_files(reference)


def test_a_damaged_shard_is_rebuilt_by_moekd_cache(copy, moe_dir, prepared, reference, capsys):
    truncate = shard_file(copy, 0)
    truncate.write_bytes(truncate.read_bytes()[:100])  # another size: every resume checks sizes
    flipped = shard_file(copy, 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # the same size: only a full check finds it
    flipped.write_bytes(bytes(data))
    assert main(["cache", str(copy), f"teacher={moe_dir('mixtral')}", f"data={prepared}", "top_k=16",
                 "shard_size=8", "batch_size=4", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "shard 0 is computed again: its file shards/shard-00000-" in out and "1 already committed" not in out
    assert [p.split(" (")[0] for p in verify_cache(copy)] == ["shard 2"]
    assert main(["cache", str(copy), f"teacher={moe_dir('mixtral')}", f"data={prepared}", "top_k=16",
                 "shard_size=8", "batch_size=4", "device=cpu", "verify=true"]) == 0
    assert "shard 2 is computed again: sha256 differs" in capsys.readouterr().out
    assert verify_cache(copy) == [] and fixtures.cache_files(copy) == fixtures.cache_files(reference)


@pytest.mark.parametrize("what", ["shard", "record", "manifest"])
def test_a_fifo_in_place_of_a_cache_file_is_one_line_for_every_reader_and_never_blocks(
        what, copy, student_dir, tmp_path, prepared, tokenizer_dir, moe_dir, reference, capsys):
    path = {"shard": shard_file(copy, 1), "record": copy / "commits" / "shard-00001.json",
            "manifest": copy / "manifest.json"}[what]
    path.unlink()
    os.mkfifo(path)
    verify, inspect, train_, eval_ = commands(copy, student_dir, tmp_path, prepared)
    if what == "shard":  # the summary reads no shard: show a row of shard 1
        inspect += ["--seq", 9, "--tokenizer", tokenizer_dir]
    with no_hang():
        for command in (verify, inspect, train_, eval_):
            assert f"{path.name} (cache file) is a FIFO, not a regular file" in moekd(capsys, *command)
        if what == "manifest":
            assert "is a FIFO" in moekd(capsys, "cache", copy, "--teacher", moe_dir("mixtral"), "--data", prepared)
            path.unlink()  # the manifest is gone: its records (the same identity's) are taken up again
        make_cache(copy, moe_dir("mixtral"), prepared)
    assert verify_cache(copy) == [] and fixtures.cache_files(copy) == fixtures.cache_files(reference)


def test_a_directory_in_place_of_the_manifest_is_one_line_even_to_overwrite(copy, student_dir, tmp_path, prepared,
                                                                             moe_dir, capsys):
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").mkdir()
    for command in commands(copy, student_dir, tmp_path, prepared):
        assert "manifest.json (cache file) is a directory, not a regular file" in moekd(capsys, *command)
    assert "is a directory where the cache keeps a file; moekd does not remove directories it did not make" \
        in moekd(capsys, "cache", copy, "--teacher", moe_dir("mixtral"), "--data", prepared, "overwrite=true")
    assert (copy / "manifest.json").is_dir()


DEEP = '{"a": ' * 100_000 + "1" + "}" * 100_000


@pytest.mark.parametrize("what, content, message", [
    ("manifest", DEEP, "is nested more than 64 levels deep"),
    ("manifest", '{"format": "moekd-teacher-cache", "version": ' + "3" * 5000 + "}", "holds a number of 5000"),
    ("record", "[" * 20_000 + "]" * 20_000, "is nested more than 64 levels deep"),  # within a record's size
    ("record", '{"rows": ' + "8" * 5000 + "}", "holds a number of 5000"),
    ("record", " " * (65 << 10), r"\(cache file\) is 66560 bytes, more than the 65536 bytes it may have"),
])
def test_json_moekd_could_not_have_written_is_one_line_for_every_reader(what, content, message, copy, student_dir,
                                                                        tmp_path, prepared, moe_dir, reference,
                                                                        capsys):
    (copy / "manifest.json" if what == "manifest" else copy / "commits" / "shard-00002.json").write_text(content)
    for command in commands(copy, student_dir, tmp_path, prepared):
        assert re.search(message, moekd(capsys, *command))
    if what == "record":  # `moekd cache` computes the shard again and replaces the record
        make_cache(copy, moe_dir("mixtral"), prepared)
        assert verify_cache(copy) == [] and fixtures.cache_files(copy) == fixtures.cache_files(reference)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_in_a_model_directory_is_one_line(name, tmp_path, student_dir, prepared, reference, capsys):
    model = Path(shutil.copytree(student_dir, tmp_path / "model"))
    (model / name).unlink()
    os.mkfifo(model / name)
    with no_hang():
        for command in (["eval", "--output", tmp_path / "eval", f"models={{m: {model}}}", f"data=[{prepared}]",
                         "--no-generate", "--device", "cpu"],
                        ["train", tmp_path / "run", "--student", model, "--cache", reference, "--device", "cpu"]):
            assert f"{name} (in a model directory) is a FIFO, not a regular file" in moekd(capsys, *command)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("content, message", [
    ('{"config": ' * 100_000 + "{}" + "}" * 100_000, "is nested more than 64 levels deep"),
    ('{"world_size": ' + "1" * 5000 + "}", "holds a number of 5000 characters"),
])
def test_a_run_json_moekd_could_not_have_written_is_one_line(content, message, tmp_path, student_dir, reference,
                                                              capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content)
    err = moekd(capsys, "train", run, "--student", student_dir, "--cache", reference, "--device", "cpu")
    assert f"run settings {run / 'run.json'} {message}" in err and (run / "run.json").read_text() == content


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
    # whoever hands it over can write its record too: the checkpoint checks out, and its loading refuses it
    (first / CHECKPOINT_RECORD).write_text(json.dumps(checkpoint_record(first, 1)))
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


# ---------------------------------------------------------------- 5. checkpoints are trusted by what they hold

RUN_ARGS = ("--device", "cpu", "--dtype", "float32", "max_steps=3", "save_every=1", "keep_checkpoints=3",
            "keep_checkpoints_at_end=true", "batch_size=4")


def train_command(run: Path, student_dir: Path, cache_dir: Path, *more: str) -> list[str]:
    return list(map(str, ["train", run, "--student", student_dir, "--cache", cache_dir, *RUN_ARGS, *more]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, student_dir, reference) -> Path:
    """A run of 3 steps with a checkpoint after each, kept: what every interrupted run below must end as."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_command(run, student_dir, reference)) == 0
    return run


def interrupted(finished: Path, run: Path, after: int) -> Path:
    """A copy of the finished run as a kill after checkpoint `after` leaves it (its metrics may list later steps)."""
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    for later in range(after + 1, 4):
        shutil.rmtree(run / f"checkpoints/step-{later:08d}")
    return run


def checkpoint(run: Path, step: int) -> Path:
    return run / f"checkpoints/step-{step:08d}"


def rerun(capsys, run: Path, student_dir: Path, cache_dir: Path, *more: str) -> tuple[str, list[str]]:
    """Re-run the run's command to its end: (stdout, the warning lines on stderr)."""
    capsys.readouterr()
    assert main(train_command(run, student_dir, cache_dir, *more)) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return out, [line for line in err.splitlines() if line.startswith("moekd train: warning: ")]


def assert_same_run(run: Path, finished: Path) -> None:
    """`run` ended as the uninterrupted run: the same metrics, each step once, and the same student."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for got, want in zip(records, expected):
        assert {k: got[k] for k in ("loss", "ce", "kd", "lr", "grad_norm", "tokens")} == \
               {k: want[k] for k in ("loss", "ce", "kd", "lr", "grad_norm", "tokens")}
    got, want = load_file(run / "final/model.safetensors"), load_file(finished / "final/model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in got)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def replace_by_link(path: Path) -> None:
    """`path` replaced by a link to the same bytes outside the checkpoint."""
    outside = path.parents[2] / "outside"
    shutil.move(path, outside)
    path.symlink_to(outside)


DAMAGES = {
    "cut weights": (lambda run: truncate(checkpoint(run, 3) / "model.safetensors"),
                    r"model.safetensors is \d+ bytes, and its record says \d+"),
    "another step's trainer state": (lambda run: shutil.copy(checkpoint(run, 2) / TRAINER_STATE,
                                                             checkpoint(run, 3) / TRAINER_STATE),
                                     "trainer.pt is not the file its record gives the sha256 of"),
    "no trainer state": (lambda run: (checkpoint(run, 3) / TRAINER_STATE).unlink(), "it lacks trainer.pt"),
    "a file it does not list": (lambda run: (checkpoint(run, 3) / "pytorch_model.bin").write_bytes(b"x"),
                                "it holds pytorch_model.bin, which its checkpoint.json does not list"),
    "a link": (lambda run: replace_by_link(checkpoint(run, 3) / "config.json"),
               "config.json is a link, or not a regular file"),
    "an older moekd's": (lambda run: (checkpoint(run, 3) / CHECKPOINT_RECORD).unlink(),
                         r"it has no checkpoint.json \(written by a moekd that did not record what its checkpoints "
                         r"hold, or not by moekd\)"),
    "another step's, renamed": (lambda run: (shutil.rmtree(checkpoint(run, 3)),
                                             shutil.copytree(checkpoint(run, 2), checkpoint(run, 3))),
                                "its checkpoint.json is that of step 2"),
    "a record that is not UTF-8": (lambda run: (checkpoint(run, 3) / CHECKPOINT_RECORD).write_bytes(b'{"step": \xff}'),
                                   r"its checkpoint.json is not valid JSON: .*"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_newest_checkpoint_that_does_not_check_out_is_passed_over_with_a_warning(
        tmp_path, finished, student_dir, reference, capsys, damage):
    damage_it, message = DAMAGES[damage]
    run = interrupted(finished, tmp_path / "run", after=3)
    damage_it(run)
    out, warnings = rerun(capsys, run, student_dir, reference)
    assert len(warnings) == 1 and re.search(f"step-00000003 does not check out: {message}; it is passed over",
                                            warnings[0]), warnings
    assert "resuming after step 2" in out
    assert_same_run(run, finished)
    check_checkpoint(checkpoint(run, 3))  # written again, whole


def test_stray_entries_named_like_checkpoints_are_none_and_do_not_block_the_run(
        tmp_path, finished, student_dir, reference, capsys):
    run = interrupted(finished, tmp_path / "run", after=2)
    checkpoint(run, 3).write_text("not a checkpoint")  # once blamed on a full disk at every re-run
    (tmp_path / "target").mkdir()
    (tmp_path / "target/keep").write_text("kept")
    checkpoint(run, 9).symlink_to(tmp_path / "target", target_is_directory=True)
    out, warnings = rerun(capsys, run, student_dir, reference)
    assert warnings == [] and "resuming after step 2" in out
    assert_same_run(run, finished)
    check_checkpoint(checkpoint(run, 3))
    assert not checkpoint(run, 9).exists() and (tmp_path / "target/keep").read_text() == "kept"  # the link only


@pytest.mark.parametrize("damage", ["cut weights", "an older moekd's"])
def test_a_run_none_of_whose_checkpoints_checks_out_is_refused_until_overwrite(
        tmp_path, finished, student_dir, reference, capsys, damage):
    run = interrupted(finished, tmp_path / "run", after=3)
    for step in (1, 2):
        shutil.rmtree(checkpoint(run, step))
    DAMAGES[damage][0](run)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    err = moekd(capsys, *train_command(run, student_dir, reference))
    assert re.search(f"no checkpoint of {re.escape(str(run))} checks out .*step-00000003 does not check out: "
                     f"{DAMAGES[damage][1]}.*set overwrite=true to start the run afresh", err), err
    assert (run / "metrics.jsonl").read_bytes() == metrics_before and checkpoint(run, 3).is_dir()  # untouched
    out, warnings = rerun(capsys, run, student_dir, reference, "overwrite=true")
    assert "resuming" not in out and len(warnings) == 1
    assert_same_run(run, finished)


def test_a_trainer_state_of_another_step_is_refused_even_under_a_matching_record(tmp_path, finished, student_dir,
                                                                                reference, capsys):
    run = interrupted(finished, tmp_path / "run", after=3)
    shutil.copy(checkpoint(run, 2) / TRAINER_STATE, checkpoint(run, 3) / TRAINER_STATE)
    record = json.loads((checkpoint(run, 3) / CHECKPOINT_RECORD).read_text())
    record["files"][TRAINER_STATE] = json.loads((checkpoint(run, 2) / CHECKPOINT_RECORD).read_text())["files"][TRAINER_STATE]
    (checkpoint(run, 3) / CHECKPOINT_RECORD).write_text(json.dumps(record))  # forged to match
    assert "trainer.pt is the state after step 2, not after step 3" in moekd(
        capsys, *train_command(run, student_dir, reference))


class FullDisk(io.RawIOBase):
    """A file whose writes fail as on a full disk once `room` bytes are written."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)


def fail_second_call(monkeypatch, target: str, write) -> None:
    """Make the second call of `target` (module.name) fail through `write(real function, *args)`."""
    module, name = target.rsplit(".", 1)
    real, calls = getattr(importlib.import_module(module), name), []

    def failing(*args, **kwargs):
        calls.append(1)
        return write(real, *args, **kwargs) if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(f"{module}.{name}", failing)


def cut_weights(real, tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)  # safetensors wrote some of the file, then reported its OSError as text
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def cut_state(real, state, file):
    real(state, FullDisk(file, room=4096))  # torch.save raises a RuntimeError from the file's OSError


def denied_state(real, state, file):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("target, write, message", [
    ("transformers.modeling_utils.safe_save_file", cut_weights, "disk full while writing {checkpoint}; "
     "everything committed before it is kept, free some space and re-run the same command to resume"),
    ("torch.save", cut_state, "disk full while writing {checkpoint}; everything committed before it is kept"),
    ("torch.save", denied_state, r"could not write checkpoint {checkpoint} \(PermissionError: .*Permission denied\); "
     "the earlier checkpoints are intact"),
], ids=["weights on a full disk", "trainer state on a full disk", "trainer state denied"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_earlier_one_resumes(
        tmp_path, finished, student_dir, reference, capsys, monkeypatch, target, write, message):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_second_call(patch, target, write)
        err = moekd(capsys, *train_command(run, student_dir, reference))
    assert re.search(message.format(checkpoint=re.escape(str(checkpoint(run, 2)))), err), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]  # no half checkpoint
    check_checkpoint(checkpoint(run, 1))
    out, warnings = rerun(capsys, run, student_dir, reference)
    assert warnings == [] and "resuming after step 1" in out
    assert_same_run(run, finished)


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_metrics_line_that_is_not_utf8_never_blocks_a_resume(tmp_path, finished, student_dir, reference, capsys,
                                                                where):
    run = interrupted(finished, tmp_path / "run", after=2)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    if where == "last":  # a kill mid-line
        lines[-1] = lines[-1][:20] + b"\xff\xfe"
    else:
        lines[0] = b'{"step": 1, "loss": "\xff"}\n'
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    out, warnings = rerun(capsys, run, student_dir, reference)
    assert "resuming after step 2" in out
    if where == "last":
        assert warnings == []
        assert_same_run(run, finished)
    else:
        assert warnings == [f"moekd train: warning: {run / 'metrics.jsonl'} line 1 is not a JSON object with a step; "
                            "it is dropped"]
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 3]


def test_a_run_directory_moved_or_copied_elsewhere_resumes(tmp_path, finished, student_dir, reference, capsys):
    original = interrupted(finished, tmp_path / "run", after=2)
    copied = Path(shutil.copytree(original, tmp_path / "elsewhere/copied"))
    moved = Path(shutil.move(original, tmp_path / "elsewhere/moved"))
    recorded = json.loads((copied / "run.json").read_text())
    recorded["config"] |= {"output": str(original), "parallel": "fsdp"}  # as moekd recorded them before
    (copied / "run.json").write_text(json.dumps(recorded))
    for run in (copied, moved):
        out, warnings = rerun(capsys, run, student_dir, reference)
        assert warnings == [] and "resuming after step 2" in out
        assert_same_run(run, finished)


# ---------------------------------------------------------------- 6. non-finite settings and edge inputs

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


def test_a_record_promising_rows_the_identity_does_not_give_it_is_one_line_and_recomputed(
        copy, student_dir, tmp_path, prepared, moe_dir, reference, capsys):
    edit_record(copy, 0, lambda r: r.update(rows=10_000))
    err = moekd(capsys, "eval", "--output", tmp_path / "eval", f"models={{s: {student_dir}}}", f"data=[{prepared}]",
                "--cache", copy, "--no-generate", "--device", "cpu", "kl_max_rows=20")  # the shard holds 8
    assert "says shard 0 has 10000 rows, but the identity's rows and shard_size give it 8" in err
    make_cache(copy, moe_dir("mixtral"), prepared)  # resuming does not trust it: shard 0 is computed again
    assert verify_cache(copy) == [] and fixtures.cache_files(copy) == fixtures.cache_files(reference)
