"""Process-group setup shared by the hybrid engine, the launcher scripts and the tests.

Under the ``deepspeed`` launcher (or torchrun) the rendezvous variables are already set. A plain
``python`` process gets a world of one, so single-process use needs no launcher.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed, once: NCCL on CUDA, gloo on the CPU."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)
    _unlink_cpu_allreduce_buffers()


def _unlink_cpu_allreduce_buffers() -> None:
    """DeepSpeed's CPU all-reduce (its shm op, used when every rank is on one machine) puts one
    segment per rank in /dev/shm and never unlinks it: each 2-rank CPU run left 132 MiB of RAM
    behind until reboot. Once every rank is past init, every rank has mapped every segment, so
    each rank unlinks its own name; the memory lives on until the last process unmaps it."""
    if torch.cuda.is_available() or torch.distributed.get_world_size() < 2:
        return
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down before the process exits: a rank
    that exits while another still uses the group can abort in the backend's teardown."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def default_ds_config(*, stage: int = 2, micro_batch_size: int = 1, lr: float = 1e-5,
                      offload: bool = False, grad_clip: float = 1.0) -> dict:
    """A sane DeepSpeed config when none is given: bf16 on CUDA, fp32 on the CPU."""
    on_gpu = torch.cuda.is_available()
    zero: dict = {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": on_gpu},
        "zero_optimization": zero,
        # torch's AdamW: DeepSpeed's fused Adam needs a CUDA build step, its CPU Adam a C++ build.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
