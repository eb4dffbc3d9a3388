"""The tiny pipeline through moekd's CLI, and a digest of everything it wrote: for changes that must keep every byte.

    OMP_NUM_THREADS=1 python tests/digest.py [WORK_DIR] > before.txt
    ... change the code ...
    OMP_NUM_THREADS=1 python tests/digest.py [WORK_DIR] > after.txt && diff before.txt after.txt

With the tests' tiny models and data (`fixtures`), every stage runs in this process through the CLI's
`main(argv)`: prepare; top-k, KA (with aggregate), sampled, top-p, held-out and SAR-adapted caches; SFT, KD,
KA, sampled, online, packed and SAR runs (data and on-policy sequences); eval; upcycle, student, mix and
diagnose; then every command again, reusing what it made. WORK_DIR (default: `moekd-digest` in the temporary
directory) is emptied first; it must be the same for both runs, since manifests and reports record paths.
Printed: the sha256 of every cache file, prepared file, weights file, report (less its timings), run record
and metrics (less their timings) and eval file, the eval numbers, `inspect` and `verify` of every cache, and
what every second run said. A safetensors file's metadata has no fixed order, so the routers file is digested
by its content (and the SAR-adapted cache's identity, which names that file's sha256, without it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "moekd-digest"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import fixtures  # noqa: E402
from stages.cli import main  # noqa: E402

VOLATILE = {"tokens_per_s", "peak_memory_mib", "seconds"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:24]


def scrub(value):
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def json_digest(path: Path) -> str:
    return hashlib.sha256(json.dumps(scrub(json.loads(path.read_text())), sort_keys=True).encode()).hexdigest()[:24]


def moekd(*argv, quiet: bool = True) -> str:
    """Run `moekd argv...`; its stdout (the exit status must be 0)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"moekd {' '.join(map(str, argv))} exited {code}:\n{err.getvalue()[-3000:]}")
    return out.getvalue()


def show(title: str, text: str) -> None:
    print(f"--- {title}")
    for line in text.strip().splitlines():
        print(f"    {line}")


def files_of(directory: Path, label: str) -> None:
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory)
        if path.suffix == ".png" or ".lock" in path.name:
            continue
        if path.name == "routers.safetensors":  # safetensors writes its metadata in no fixed order
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                content = [sorted(f.metadata().items())] + [(k, f.get_tensor(k).tolist()) for k in sorted(f.keys())]
            digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:24]
        elif label == "cache/sar" and path.suffix == ".json":  # names the routers file by its (unstable) sha256
            data = json.loads(path.read_text())
            data.get("identity", {}).get("teacher", {}).pop("routers", None)
            data.pop("cache", None)
            digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]
        elif path.name == "metrics.jsonl":
            lines = [scrub(json.loads(line)) for line in path.read_text().splitlines()]
            digest = hashlib.sha256(json.dumps(lines, sort_keys=True).encode()).hexdigest()[:24]
        elif path.suffix == ".json" and path.parent.name not in ("commits",) and path.name != "manifest.json":
            digest = json_digest(path)
        else:
            digest = sha(path)
        print(f"{label}/{rel}  {digest}")


def digest(work: Path = WORK) -> None:
    """Run it all in `work` (emptied first) and print the digest."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tok = fixtures.make_tokenizer(work / "tokenizer")
    teacher = fixtures.make_moe(work / "teacher", "mixtral", tok)
    qwen = fixtures.make_moe(work / "qwen", "qwen2_moe", tok)
    student = fixtures.make_student(work / "student", tok)
    records = fixtures.instruction_records(48, seed=0)
    for i, r in enumerate(records):
        r["domain"] = ("a", "b")[i % 2]
    train_jsonl = fixtures.write_jsonl(work / "train.jsonl", records)
    heldout_jsonl = fixtures.write_jsonl(work / "heldout.jsonl", fixtures.instruction_records(16, seed=9))
    prepared, heldout = work / "prepared", work / "heldout"
    c = work / "cache"
    runs = work / "runs"
    common = ["device=cpu", "dtype=float32"]
    train_common = [f"student={student}", "batch_size=4", "max_steps=3", "save_every=2", "optim.warmup_steps=1",
                    "optim.lr=3e-3",
                    "shard_size=16", f"eval_data={heldout}", *common]

    def everything() -> list[str]:
        """Every command, in order; run twice (the second run reuses what the first made)."""
        said = []
        said.append(moekd("prepare", f"inputs=[{train_jsonl}]", f"output={prepared}", f"tokenizer={tok}"))
        said.append(moekd("prepare", f"inputs=[{heldout_jsonl}]", f"output={heldout}", f"tokenizer={tok}"))
        said.append(moekd("cache", c / "kd", f"teacher={teacher}", f"data={prepared}", "top_k=16", "shard_size=16",
                          "batch_size=4", *common))
        said.append(moekd("cache", c / "ka", f"teacher={teacher}", f"data={prepared}", "top_k=16", "shard_size=16",
                          "routing.mode=ka", "routing.samples=2", "routing.k_s=3", "aggregate=true", *common))
        said.append(moekd("cache", c / "sampled", f"teacher={teacher}", f"data={prepared}", "storage=sampled",
                          "draws=32", "routing.mode=ka", "routing.samples=2", "shard_size=16", *common))
        said.append(moekd("cache", c / "qwen-top_p", f"teacher={qwen}", f"data={prepared}", "top_k=8",
                          "routing.mode=top_p", "routing.top_p=0.8", "shard_size=32", *common))
        said.append(moekd("cache", c / "heldout", f"teacher={teacher}", f"data={heldout}", "top_k=384", *common))
        said.append(moekd("train", runs / "sft", f"data={prepared}", "loss.alpha=0", *train_common))
        said.append(moekd("train", runs / "kd", f"cache={c / 'kd'}", f"eval_cache={c / 'heldout'}", *train_common))
        said.append(moekd("train", runs / "ka", f"cache={c / 'ka'}", "ka_samples=one", *train_common))
        said.append(moekd("train", runs / "ka-agg", f"cache={c / 'ka'}", "ka_samples=aggregate", "cache_top_k=8",
                          *train_common))
        said.append(moekd("train", runs / "sampled", f"cache={c / 'sampled'}", *train_common))
        said.append(moekd("train", runs / "online", f"data={prepared}", f"teacher={teacher}", "top_k=16",
                          "routing.mode=ka", "routing.samples=2", "loss.tail=renormalize", *train_common))
        said.append(moekd("train", runs / "packed", f"cache={c / 'kd'}", "pack_length=64", "optim.grad_accum=2",
                          *train_common))
        said.append(moekd("sar", runs / "sar", f"teacher={teacher}", f"data={prepared}", "router.optim.lr=1e-3",
                          *train_common))
        said.append(moekd("sar", runs / "sar-onpolicy", f"teacher={teacher}", f"data={prepared}",
                          "sequences=student", "max_new_tokens=6", "routing.mode=ka", "routing.samples=1",
                          *train_common))
        said.append(moekd("cache", c / "sar", f"teacher={teacher}", f"data={prepared}", "top_k=16", "shard_size=16",
                          f"routers={runs / 'sar' / 'routers.safetensors'}", *common))
        said.append(moekd("eval", f"models={{teacher: {teacher}, sft: {runs / 'sft' / 'final'}, "
                                  f"kd: {runs / 'kd' / 'final'}}}", f"data=[{heldout}]", f"output={work / 'eval'}",
                          f"cache={c / 'heldout'}", "max_new_tokens=6", "batch_size=4", *common))
        said.append(moekd("upcycle", f"source={student}", f"calibration={train_jsonl}", f"output={work / 'upcycled'}",
                          "layout.num_experts=4", "layout.top_k=2", "layout.shared_size=16",
                          "calibration_tokens=512", "sequence_length=32", "router_steps=10"))
        said.append(moekd("student", f"source={student}", f"output={work / 'pruned'}", "ffn_size=32", "heads=2",
                          f"calibration={train_jsonl}", "calibration_tokens=512", "sequence_length=32"))
        said.append(moekd("mix", f"branches={{a: {runs / 'sft' / 'final'}, b: {runs / 'kd' / 'final'}}}",
                          f"calibration={train_jsonl}", f"output={work / 'mixed'}", "top_k=1",
                          "calibration_tokens=512", "sequence_length=32"))
        said.append(moekd("diagnose", f"teacher={work / 'mixed'}", f"data={heldout}", f"output={work / 'diagnose'}",
                          f"student={student}", "batch_size=4", *common))
        return said

    first = everything()
    for name in ("kd", "ka", "sampled", "qwen-top_p", "heldout", "sar"):
        files_of(c / name, f"cache/{name}")
        show(f"inspect {name}", moekd("inspect", c / name))
        show(f"verify {name}", moekd("verify", c / name))
    show("inspect ka seq 3", moekd("inspect", c / "ka", "seq=3", f"tokenizer={tok}", "max_positions=3"))
    show("inspect sampled seq 5", moekd("inspect", c / "sampled", "seq=5", f"tokenizer={tok}", "max_positions=3"))
    for name in ("prepared", "heldout"):
        files_of(work / name, name)
    for run in sorted(runs.iterdir()):
        files_of(run, f"runs/{run.name}")
    for name in ("upcycled", "pruned", "mixed", "diagnose", "eval"):
        files_of(work / name, name)
    results = json.loads((work / "eval" / "results.json").read_text())
    for model in results["models"]:
        overall = model["overall"]
        print(f"eval {model['name']}: loss {overall['loss']!r} rougeL {overall.get('rougeL')!r} "
              f"exact {overall.get('exact')!r} kl {model['kl']['kl']!r}")
    second = everything()
    for i, text in enumerate(second):
        show(f"second run, command {i}", "\n".join(line for line in text.splitlines() if "tok/s" not in line))
    del first


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    digest(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else WORK)
