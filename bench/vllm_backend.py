"""Benchmark stage one's backends on one teacher and data: vLLM against transformers, as ratios to a bare forward.

    .venv-vllm/bin/python bench/vllm_backend.py [--rows 256] [--samples 4] [--dtype float32] [--device cpu]
    .venv-vllm/bin/python bench/vllm_backend.py --teacher DIR --data DIR      # a real teacher and prepared split

Runs in vLLM's environment (scripts/setup_vllm.sh on CPU; the `vllm` wheel on GPU). One run, one machine:
  forward      = transformers `model(input_ids, attention_mask)` over the cache stage's own padded batches
                 (`--batch-size` rows), once per routing sample: the reference;
  transformers = `moekd cache` with the transformers backend, end to end (routing hooks, top-k, Parquet,
                 zstd, sha256, commit), model loading excluded;
  vllm         = `moekd cache backend=vllm`, end to end, engine start-up excluded;
each for top-k routing (M = 1) and KA (M = `--samples`, λ = 0.05). Printed: tokens/s (response tokens ×
samples per second) and each as a ratio to the forward of the same M. The default teacher is a random
Mixtral with SmolLM2's vocabulary (49,152; hidden 256, 4 layers, 8 experts, top-2) in shapes vLLM's CPU
kernels take; on a GPU pass `--dtype bfloat16 --device cuda` and a real-size teacher (`--teacher`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
from cache_throughput import synthetic_teacher, time_bare_forward  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from stages import cache  # noqa: E402


def cache_seconds(output: Path, teacher: Path, data: Path, overrides: list[str]) -> tuple[int, float]:
    """(response tokens, seconds of the shard loop) of one `moekd cache` run (loading excluded)."""
    config = load_config(cache.Config, None, [f"output={output}", f"teacher={teacher}", f"data={data}", *overrides])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        stats = cache.run(config)
    return stats["tokens"], stats["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher")
    parser.add_argument("--data")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            teacher, data = (Path(args.teacher), Path(args.data)) if args.teacher else synthetic_teacher(root, args.rows, head_dim=32)
        common = [f"top_k={args.top_k}", f"batch_size={args.batch_size}", f"shard_size={args.shard_size}",
                  f"dtype={args.dtype}", f"device={args.device}"]
        print(f"teacher {teacher.name if args.teacher else 'random Mixtral (49,152 vocabulary)'}, {args.dtype} on "
              f"{args.device}, k={args.top_k}, torch threads {torch.get_num_threads()}")
        for samples in (1, args.samples):
            routing = ["routing.mode=ka", f"routing.samples={samples}", "routing.lam=0.05"] if samples > 1 else []
            forward = time_bare_forward(teacher, data, args.batch_size, args.shard_size, samples, args.dtype,
                                        args.device)
            tokens, hf = cache_seconds(root / f"hf{samples}", teacher, data, common + routing)
            _, vllm = cache_seconds(root / f"vllm{samples}", teacher, data, common + routing + ["backend=vllm"])
            rate = tokens * samples
            print(f"M={samples}: forward {rate / forward:8.0f} tok/s | transformers cache {rate / hf:8.0f} tok/s "
                  f"({forward / hf:.2f}x the forward) | vllm cache {rate / vllm:8.0f} tok/s ({forward / vllm:.2f}x the "
                  f"forward, {hf / vllm:.2f}x transformers)")


if __name__ == "__main__":
    main()
