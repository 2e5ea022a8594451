"""Refine a model's training-set probabilities sharded over processes with torch.distributed.

One machine, two processes (Gloo on CPUs, NCCL when every process has a GPU):

    torchrun --nproc-per-node 2 docs/examples/distributed_refine.py probs.npy forget.npy out/

Several machines: the same script, started on each node with the rendezvous of the first, e.g.

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R \
        --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        docs/examples/distributed_refine.py probs.npy forget.npy out/

Each rank refines rows [start, stop) of probs.npy (its share of N) and writes them to
out/q-rank{RANK}.npy; concatenated in rank order they are the single-process Q. With --stream each
rank streams its rows from the file (ppu_fast.refine_file, O(chunk) memory) instead of loading
them. Every rank ends with the same alpha (printed by rank 0).
"""

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ppu_fast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("probs", help="N x k probabilities, .npy")
    ap.add_argument("forget", help="(N,) bool forget mask, .npy")
    ap.add_argument("out_dir")
    ap.add_argument("--stream", action="store_true", help="stream rows from the file")
    ap.add_argument("--chunk-rows", type=int, default=None)
    args = ap.parse_args()

    use_gpu = torch.cuda.is_available()
    if use_gpu:  # NCCL: one GPU per process
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD

    n = np.load(args.probs, mmap_mode="r").shape[0]
    start, stop = rank * n // world, (rank + 1) * n // world
    forget = np.load(args.forget)[start:stop]
    out = Path(args.out_dir) / f"q-rank{rank}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.stream:
        info = ppu_fast.refine_file(args.probs, forget, out, rows=(start, stop),
                                    chunk_rows=args.chunk_rows, process_group=group,
                                    device="cuda" if use_gpu else "cpu")
    else:
        probs = torch.from_numpy(np.load(args.probs, mmap_mode="r")[start:stop].copy())
        if use_gpu:
            probs = probs.cuda()
        q, info = ppu_fast.refine(probs, forget, process_group=group, return_info=True)
        np.save(out, q.cpu().numpy())
    if rank == 0:
        print(f"{world} ranks, N = {n}: {info.iterations} passes, residual {info.residual:.2e}, "
              f"converged {info.converged}, {info.seconds:.3f} s; alpha[:4] = "
              f"{info.alpha[:4].tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
