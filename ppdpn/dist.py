"""Everything distributed: device choice, Fleet init, rank queries, collectives.

No other module reads PADDLE_* or SLURM_* variables; no other module picks the device.
This module imports nothing of the project.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as pdist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # "cpu" or "gpu:<local_rank>"

    @property
    def use_gpu(self) -> bool:
        return self.device.startswith("gpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dali_device_id(self):
        """DALI's device_id: the local GPU, or None for a CPU-only pipeline."""
        return self.local_rank if self.use_gpu else None


_CTX = DistContext()


def gpu_count() -> int:
    """GPUs Paddle can use (0 on the CPU build)."""
    if not paddle.is_compiled_with_cuda():
        return 0
    try:
        return paddle.device.cuda.device_count()
    except Exception:  # a CUDA build without a driver
        return 0


def select_device(preference: str = "auto", local_rank: int = 0) -> str:
    """The one place that chooses GPU or CPU for the model, DALI and AMP."""
    n = gpu_count()
    if preference == "gpu" and n == 0:
        raise RuntimeError("Global.device=gpu but no GPU is visible to Paddle "
                           "(CPU build installed, or CUDA_VISIBLE_DEVICES hides them)")
    if preference == "cpu" or n == 0:
        return "cpu"
    return f"gpu:{local_rank % n}"


def env_rank_world() -> tuple:
    """(rank, world_size, local_rank) as set by paddle.distributed.launch."""
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    local = int(os.environ.get("PADDLE_LOCAL_RANK", os.environ.get("FLAGS_selected_gpus", rank) or 0))
    return rank, world, local


def gpu_flags(amp: bool, deterministic: bool) -> dict:
    """Every cuDNN setting a run makes, decided here from (amp, deterministic). The CPU
    build does not define these flags; init_distributed sets them on a GPU only.

    - FLAGS_cudnn_exhaustive_search: time every cuDNN conv algorithm once per shape and keep
      the fastest (NVIDIA's Paddle RN50 and PaddleClas's GPU scripts turn it on; costs a few
      seconds in the first steps, and input shapes are fixed here). Never together with
      FLAGS_cudnn_deterministic: Paddle's cuDNN conv kernel refuses that pair at the first
      convolution ("Cann't set exhaustive_search True and FLAGS_cudnn_deterministic True at
      same time"), so a deterministic run takes cuDNN's deterministic algorithms instead.
    - FLAGS_conv_workspace_size_limit (MB): let those algorithms use up to 4 GB of scratch
      (NVIDIA's RN50: 4096; Paddle's default 512 rules out the fastest ones).
    - FLAGS_cudnn_batchnorm_spatial_persistent: cuDNN's faster persistent BatchNorm, which
      also gives fp16 NHWC batches a native NHWC kernel. PaddleClas enables it for AMP only:
      Paddle documents that it can overflow for some fp32 input ranges. Off in
      deterministic runs: its backward reduces with atomics (cuDNN documents the persistent
      mode as possibly non-deterministic).
    """
    if deterministic:
        return {"FLAGS_cudnn_deterministic": True, "FLAGS_cudnn_exhaustive_search": False,
                "FLAGS_conv_workspace_size_limit": 4096}
    flags = {"FLAGS_cudnn_exhaustive_search": True, "FLAGS_conv_workspace_size_limit": 4096}
    if amp:
        flags["FLAGS_cudnn_batchnorm_spatial_persistent"] = True
    return flags


def init_distributed(device_preference: str = "auto", amp: bool = False,
                     deterministic: bool = False) -> DistContext:
    """Set the device (with gpu_flags(amp, deterministic) on a GPU) and, under the
    launcher with more than one process, start Fleet collective."""
    global _CTX
    rank, world, local = env_rank_world()
    device = select_device(device_preference, local)
    paddle.set_device(device)
    if device.startswith("gpu"):
        paddle.set_flags(gpu_flags(amp, deterministic))
    if world > 1:
        from paddle.distributed import fleet

        from ppdpn.quiet import fleet_start
        with fleet_start():
            fleet.init(is_collective=True, strategy=build_strategy(), log_level="WARNING")
    _CTX = DistContext(rank=rank, world_size=world, local_rank=local, device=device)
    return _CTX


def context() -> DistContext:
    return _CTX


def build_strategy():
    """Fleet strategy: gradients all-reduced in fused 32 MB buckets (fewer NCCL calls).

    In dygraph, DataParallel's reducer groups gradients into buckets of this size and
    starts each bucket's all-reduce as soon as its gradients are ready, overlapping the
    communication with the rest of the backward pass."""
    from paddle.distributed import fleet
    strategy = fleet.DistributedStrategy()
    strategy.fuse_all_reduce_ops = True
    strategy.fuse_grad_size_in_MB = 32
    return strategy


def wrap_model(model):
    if _CTX.world_size == 1:
        return model
    from paddle.distributed import fleet
    return fleet.distributed_model(model)


def gradient_sync(model, sync: bool):
    """Context for one batch's forward and backward: with sync False the gradients only
    accumulate locally (DataParallel.no_sync), so a step of Global.accum_steps batches
    all-reduces once, in its last backward."""
    if sync or _CTX.world_size == 1:
        return nullcontext()
    return model.no_sync()


def wrap_optimizer(optimizer):
    if _CTX.world_size == 1:
        return optimizer
    from paddle.distributed import fleet
    return fleet.distributed_optimizer(optimizer)


def unwrap(model):
    """The plain Layer inside a DataParallel wrapper."""
    return getattr(model, "_layers", model)


def all_reduce_sum(values) -> np.ndarray:
    """Sum a float64 vector over ranks (gloo and NCCL both take SUM; AVG fails on gloo)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if _CTX.world_size == 1:
        return arr
    t = paddle.to_tensor(arr)
    pdist.all_reduce(t, op=pdist.ReduceOp.SUM)
    return t.numpy()


def ranks_agree(value: float) -> bool:
    """True when every rank holds the same float (max == min over ranks)."""
    if _CTX.world_size == 1:
        return True
    t = paddle.to_tensor(np.asarray([value, -value], dtype=np.float64))
    pdist.all_reduce(t, op=pdist.ReduceOp.MAX)
    hi, neg_lo = t.numpy()
    return bool(hi == -neg_lo)


def weights_checksum(model) -> float:
    """A float64 fingerprint of the trainable weights (for the ranks-agree check)."""
    total = 0.0
    trainable = [p for p in unwrap(model).parameters() if not p.stop_gradient]
    for i, p in enumerate(trainable):
        total += float(p.astype("float64").abs().sum().item()) * (1.0 + 1e-3 * i)
    return total


def while_writing(write, poll_s: float = 1.0) -> None:
    """Run `write` (rank 0's checkpoint write; None on the other ranks) in a thread while
    all ranks sum a "still writing" flag every `poll_s` seconds, until it is done
    everywhere; then raise what `write` raised. Any one collective waits at most
    `poll_s` plus a step, so no write is too slow for gloo's fixed 30 s timeout."""
    if _CTX.world_size == 1:
        if write is not None:
            write()
        return
    import threading
    failed = []

    def run():
        try:
            write()
        except BaseException as e:  # re-raised in the calling thread below
            failed.append(e)
    worker = None
    if write is not None:
        worker = threading.Thread(target=run, name="checkpoint-write", daemon=True)
        worker.start()
    while True:
        if worker is not None:
            worker.join(poll_s)
        busy = worker is not None and worker.is_alive()
        if all_reduce_sum([float(busy)])[0] == 0:
            break
    if failed:
        raise failed[0]


def running_stats(model):
    """BatchNorm running mean/variance (Paddle keeps them as non-trainable parameters)."""
    from paddle.nn.layer.norm import _BatchNormBase
    for layer in unwrap(model).sublayers():
        if isinstance(layer, _BatchNormBase):
            yield layer._mean
            yield layer._variance


def average_buffers(model):
    """Average BN running stats over ranks: DataParallel does not sync them."""
    if _CTX.world_size == 1:
        return
    for stat in running_stats(model):
        pdist.all_reduce(stat, op=pdist.ReduceOp.SUM)
        stat.set_value(stat / _CTX.world_size)


def broadcast_params(model):
    """Make every rank start from rank 0's weights and buffers."""
    if _CTX.world_size == 1:
        return
    for t in list(unwrap(model).parameters()) + list(unwrap(model).buffers()):
        pdist.broadcast(t, src=0)
