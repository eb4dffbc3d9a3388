"""Benchmark of the student's memory per rank: DDP (every rank holds the whole student, its gradients and its
AdamW state) against FSDP (each rank a shard), measured with 2 ranks on CPU, and on paper for larger students.

    python bench/memory.py runs/demo/prepared/train runs/demo/material/model [--steps 2] [--batch-size 1]

For each of ddp and fsdp, two processes (torchrun, gloo, one thread each) load
the student (the demo's SmolLM2-135M), wrap it as `moekd train` does
(`trainer.Trainer`) and take `--steps` SFT steps (float32, AdamW) on the
demo's data. A thread samples each process's resident memory (VmRSS) every
10 ms, with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_)
so that freed tensors leave the resident set (by default glibc raises the
threshold as large blocks are freed and keeps later ones cached, which hid
half of FSDP's saving here); reported per rank: the resident memory before the student is loaded
(torch and Python alone), and the most it reached during the steps; their
difference per parameter is the training state's bytes per parameter. On
paper: what DDP and FSDP hold per rank for 1.7B, 4B and 8B students (Qwen3's
shapes) on 8 ranks, counted from the parameters, without activations (the
CPU figures also hold the allocator's cached memory and activations, so they
are an upper bound of the state).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def resident_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(data: str, student: str, parallel: str, steps: int, batch_size: int, out: str) -> None:
    """One rank: load, wrap, step; rank 0 writes every rank's figures to `out`."""
    import torch

    sys.path.insert(0, str(REPO))
    from pipeline.core.processes import Distributed
    from pipeline.data.batch import collate_examples
    from pipeline.data.prepared import PreparedData
    from pipeline.data.reader import PreparedShards, Reader
    from pipeline.models.loading import load_model, load_tokenizer, pad_token_id
    from pipeline.student.losses import LossConfig
    from pipeline.student.trainer import OptimConfig, Trainer

    torch.set_num_threads(1)
    processes = Distributed("cpu")
    before = resident_mib()
    pad_id = pad_token_id(load_tokenizer(student))
    reader = Reader(PreparedShards(PreparedData(data), 256), batch_size=batch_size, shuffle_shards=4, seed=0,
                    collate=functools.partial(collate_examples, pad_id=pad_id), rank=processes.rank,
                    world_size=processes.world_size)
    batches = list(reader.batches(0, 0, steps))
    model = load_model(student, dtype="float32", device="cpu").train()
    parameters = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, optim=OptimConfig(lr=1e-5, warmup_steps=0), loss=LossConfig(alpha=0.0), total_steps=1000,
                      processes=processes, parallel=parallel)
    peak, running = [resident_mib()], True

    def sample() -> None:
        while running:
            peak.append(resident_mib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for batch in batches:
        trainer.step([batch])
    running = False
    sampler.join()
    figures = processes.gather({"before": before, "peak": max(peak), "parameters": parameters})
    if processes.rank == 0:
        Path(out).write_text(json.dumps(figures))
    trainer.close()
    processes.stop()


def measure(args, parallel: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   __file__, "--worker", parallel, str(out), args.data, args.student, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size)]
        # a fixed mmap threshold: freed tensors go back to the system, so resident memory follows live tensors
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("student")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("PARALLEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.data, args.student, args.worker[0], args.steps, args.batch_size, args.worker[1])
        return
    results = {parallel: measure(args, parallel) for parallel in ("ddp", "fsdp")}
    parameters = results["ddp"][0]["parameters"]
    print(f"student {args.student}: {parameters / 1e6:.1f}M parameters; 2 ranks (gloo, CPU, 1 thread each); "
          f"{args.steps} SFT steps of {args.batch_size} row(s) per rank, float32, AdamW")
    print("| parallel | rank | resident before loading (MiB) | peak during the steps (MiB) | state (MiB) "
          "| bytes per parameter |")
    print("|---|---|---|---|---|---|")
    for parallel, ranks in results.items():
        for rank, r in enumerate(ranks):
            state = r["peak"] - r["before"]
            print(f"| {parallel} | {rank} | {r['before']:.0f} | {r['peak']:.0f} | {state:.0f} "
                  f"| {state * 2**20 / parameters:.1f} |")
    print(f"\nOn paper, per rank of {RANKS}, without activations, for students shaped like Qwen3 (vocabulary "
          f"{VOCAB}, head_dim 128, 8 key-value heads): DDP holds {DDP_BYTES} B/parameter (float32 weights, "
          "gradients and gradient buckets, AdamW's two moments); FSDP 16/ranks B/parameter, plus, while it "
          "computes, the root unit (embeddings, head) and two decoder layers gathered in bfloat16 and the "
          "root's and one layer's float32 gradients before they are reduced")
    print("| student | parameters | DDP per rank (GB) | FSDP per rank (GB) |")
    print("|---|---|---|---|")
    for name, (hidden, layers, heads, ffn, tied) in SHAPES.items():
        layer = hidden * heads * 128 * 2 + hidden * 8 * 128 * 2 + 3 * hidden * ffn
        root = VOCAB * hidden * (1 if tied else 2)
        total = root + layers * layer
        fsdp = 16 * total / RANKS + 2 * (root + 2 * layer) + 4 * (root + layer)
        print(f"| {name} | {total / 1e9:.2f}B | {DDP_BYTES * total / 1e9:.1f} | {fsdp / 1e9:.1f} |")


RANKS, VOCAB, DDP_BYTES = 8, 151_936, 20
SHAPES = {  # hidden, layers, attention heads, MLP width, tied embeddings
    "Qwen3-1.7B": (2048, 28, 16, 6144, True),
    "Qwen3-4B": (2560, 36, 32, 9728, True),
    "Qwen3-8B": (4096, 36, 32, 12288, False),
}

if __name__ == "__main__":
    main()
