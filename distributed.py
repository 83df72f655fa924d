"""distributed.py — running on several processes (torchrun), and the devices and random states of one.

`Dist` wraps torch.distributed (with one process every call is a no-op), `shard_model` applies FSDP2, and
`pad_forwards` / `dummy_batch` keep the ranks' collective forwards matched. Also the small per-process
helpers the loop, evaluation and the curriculum share: `autocast`, `to_device`, and the RNG states that
checkpoints save (`rng_state`, `set_rng_state`, `set_seed`). Separate because none of it is RL: it is what
lets the same loop run on one CPU or many GPUs.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

# ====================================================================================================
# Distributed helpers (torchrun). With one process every call is a no-op.
# ====================================================================================================
class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.fsdp = False  # set by shard_model
        if self.enabled and not torch.distributed.is_initialized():
            # CUDA: NCCL for the model's tensors, and gloo beside it for the small CPU tensors that
            # `sum`, `max` and `gather_objects` reduce (NCCL alone has no CPU backend and fails on them)
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def max(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def average_gradients(self, model) -> None:
        """Plain data parallelism: average gradients over ranks (the W factor in the loss cancels).
        Under FSDP2 the backward already reduce-scatters the averaged gradients: nothing to do."""
        if not self.enabled or self.fsdp:
            return
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()


def shard_model(model, dist: "Dist", device: torch.device) -> None:
    """FSDP2: every rank keeps 1/W of each parameter, its gradient and its optimiser state.

    Units: each decoder layer; the input embeddings together with the LM head (tied or not: one group,
    as FSDP2 requires for tied weights, and called as modules by `token_fields`); the decoder's final
    norm (the `model.base_model` unit, which `token_fields` calls directly); the root, so that
    `generate` (registered as a forward method) gathers what it needs. Parameters are all-gathered
    just before a unit runs and freed after, and gradients are reduce-scattered (averaged) in backward.
    Every forward is a collective, so ranks must run the same number of forwards: generate uses
    `synced_gpus`, and update / prepass / evaluation pad their micro-batch counts (`pad_forwards`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.world,))
    # bf16 compute with fp32 master weights and fp32 gradient reduction on CUDA; fp32 on CPU
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    decoder = model.base_model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard([decoder.get_input_embeddings(), model.get_output_embeddings()], mesh=mesh, mp_policy=mp)
    fully_shard(decoder, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "generate")
    dist.fsdp = True


def pad_forwards(dist: "Dist", n_local: int) -> int:
    """How many empty forwards this rank must add so that every rank runs the same number (FSDP2)."""
    return int(dist.max(n_local)) - n_local if dist.fsdp else 0


def dummy_batch(pad_id: int, device) -> dict:
    """A one-token micro-batch whose loss is multiplied by 0: keeps FSDP2's collectives matched."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": 1,
            "response_mask": torch.ones((1, 1), device=device), "prompt_mask": torch.ones((1, 1), device=device)}


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def to_device(mb: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items()}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
