"""Several processes: ``curate train`` under ``torchrun`` or ``accelerate launch``.

Each process runs the whole of :func:`curate.train.sft.train` on its own share of every step (DDP:
the trainer's data loader hands each process every ``world_size``-th batch of one shuffled order),
and the gradients are averaged before each optimizer step. What this module adds to that:

- the launch arguments (:func:`launch_args`): ``ddp_backend: gloo`` when the processes run on
  CPUs (accelerate would take MPI where torch has it), ``ddp_find_unused_parameters: False`` (no
  extra pass over the graph each step: the LoRA adapters and a causal LM's weights are all used by
  every forward; a trained parameter that a forward leaves out would make DDP stop with an error), and the spec's
  ``fsdp`` / ``fsdp_config`` / ``deepspeed``, passed to the trainer unchanged;
- rank and world size from the launcher's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``), readable before the process group exists (the batch maths needs them then);
- :func:`same_order`: every process shuffles the rows the same way in every epoch (see there);
- :func:`from_main` (rank 0 decides, e.g. which checkpoint to resume, and the others take its
  answer), :func:`agree` (a value that must be the same in every process, e.g. the run's key),
  :func:`barrier`.

The train directory must be on a file system every process sees (one machine, or a shared disk):
each process checks it for a finished run before the process group exists, and the others read
rank 0's ``train.json`` at the end.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

from curate.errors import ConfigError, CurateError

DEEPSPEED_INSTALL = "pip install deepspeed"


def world_size() -> int:
    """Processes in the run (the launcher's ``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    """This process's rank (the launcher's ``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK") or 0)


def local_world_size() -> int:
    """Processes on this machine (``LOCAL_WORLD_SIZE``, else the world size)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world_size())


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0)."""
    return rank() == 0


def default_threads() -> int:
    """Torch threads per process when the spec gives none: min(2, CPU count), the CPUs shared among
    this machine's processes (at least one)."""
    return max(1, min(2, (os.cpu_count() or 1) // local_world_size()))


def check(spec) -> None:
    """Launch settings that cannot work here, refused before anything loads."""
    if spec.deepspeed is not None and spec.fsdp:
        raise ConfigError("train.deepspeed and train.fsdp: give one of them (DeepSpeed ZeRO or FSDP shard the model each their own way)")
    if spec.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.deepspeed: DeepSpeed is not installed here: {DEEPSPEED_INSTALL} (or leave train.deepspeed unset)")
    if isinstance(spec.deepspeed, str) and not os.path.exists(spec.deepspeed):
        raise ConfigError(f"train.deepspeed: {spec.deepspeed}: no such file (give a DeepSpeed JSON config file, or the config itself)")


def launch_args(spec, device: str) -> dict[str, Any]:
    """``SFTConfig`` arguments for how the run is spread over processes (see the module docstring)."""
    check(spec)
    out: dict[str, Any] = {}
    if world_size() > 1:
        out["ddp_find_unused_parameters"] = False
        if not device.startswith("cuda"):
            out["ddp_backend"] = "gloo"
    if spec.fsdp:
        out["fsdp"] = spec.fsdp
    if spec.fsdp_config is not None:
        out["fsdp_config"] = spec.fsdp_config
    if spec.deepspeed is not None:
        out["deepspeed"] = spec.deepspeed
    return out


def _group() -> bool:
    """Whether a process group of more than one process is up."""
    if world_size() < 2:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if _group():
        import torch.distributed as dist

        dist.barrier()


def from_main(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run by rank 0 only; every process returns rank 0's result (picklable)."""
    if not _group():
        return fn(*args)
    import torch.distributed as dist

    box = [fn(*args) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(what: str, value: Any) -> None:
    """Raise CurateError unless every process holds the same ``value`` (e.g. the run's key)."""
    if not _group():
        return
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise CurateError(f"train: the processes disagree on {what}: {values} (rank i holds item i); "
                          "every process must see the same export, config and train directory")


def same_order(trainer, seed: int) -> None:
    """Make the row order of each epoch a function of ``seed`` and the epoch alone.

    The trainer groups rows by length (transformers' ``LengthGroupedSampler``), which shuffles with
    the global torch generator, and dropout moves that generator on by as many draws as its rows
    have tokens. With several processes each one would then shuffle differently from the second
    epoch on (some rows trained twice in an epoch, others not at all: accelerate keeps only a
    sampler's own generator in step, and this sampler has none); with one, a run resumed in a later
    epoch would shuffle that epoch otherwise than the killed run did (the checkpoint's generator
    state is restored only after the epoch's order is drawn). Here the sampler gets a generator of
    its own at each epoch's start, seeded with ``seed`` and the epoch's number: the same order in
    every process, and a resumed epoch shuffles as the killed one did."""
    from transformers import TrainerCallback

    class SameOrder(TrainerCallback):
        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kw):
            sampler = _length_grouped_sampler(train_dataloader)
            if sampler is not None:
                import math

                import torch

                epoch = math.floor((state.epoch or 0.0) + 1e-9)  # epochs done: the one starting now (or resumed)
                sampler.generator = torch.Generator().manual_seed(seed * 100_003 + epoch)

    trainer.add_callback(SameOrder())


def _length_grouped_sampler(loader):
    """The ``LengthGroupedSampler`` under a (prepared) data loader, or None."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    todo, seen = [loader], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, LengthGroupedSampler):
            return obj
        todo += [getattr(obj, name, None) for name in ("batch_sampler", "sampler", "base_dataloader", "_loader")]
    return None
