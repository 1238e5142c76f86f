"""All-reduce bus bandwidth between this machine's GPUs (torchrun --nproc_per_node N).

torchrun --standalone --nproc_per_node 4 scripts/allreduce_bw.py
"""

import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.ones(256 * 2**20, device="cuda")  # 1 GiB of fp32
for _ in range(3):
    dist.all_reduce(x)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    dist.all_reduce(x)
torch.cuda.synchronize()
s = (time.perf_counter() - t) / 10
if rank == 0:
    busbw = 2 * (world - 1) / world * x.numel() * 4 / s / 1e9
    print(f"all-reduce 1 GiB on {world} GPUs: {s * 1e3:.1f} ms, bus bandwidth {busbw:.0f} GB/s")
dist.destroy_process_group()
