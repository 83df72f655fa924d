"""distributed.py — running on several processes (torchrun), and the devices and random states of one.

`Dist` wraps torch.distributed (with one process every call is a no-op), `shard_model` applies FSDP2, and
`pad_forwards` / `dummy_batch` keep the ranks' collective forwards matched. Also the small per-process
helpers the loop, evaluation and the curriculum share: `autocast`, `to_device`, the RNG states that
checkpoints save (`rng_state`, `set_rng_state`, `set_seed`), and each process's share of the CPU threads
(`set_torch_threads`). Separate because none of it is RL: it is what lets the same loop run on one CPU or
many GPUs.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

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


def load_optimizer_state(model, optimizer, state: dict, dist: "Dist") -> None:
    """A checkpoint's full (name-keyed) optimiser state; under FSDP2 each rank takes its shards."""
    if dist.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def clip_and_step(model, optimizer, grad_clip: float, dist: "Dist") -> tuple[float, bool]:
    """Average the gradients over ranks, clip their global norm, step unless it is not finite (the step is
    then skipped, and logged), zero them. Returns (gradient norm before clipping, stepped)."""
    dist.average_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), stepped


def reduce_stats(stats: dict, dist: "Dist", n_tokens: float) -> dict:
    """A loss's stats summed over micro-batches → global values: "<x>_count" / "<x>_sum" become per-token
    means "<x>" (clip_low / clip_high as clip_frac_low / clip_frac_high), others global sums. Every rank
    reduces the same keys in the same order (a rank may hold no rows of this batch)."""
    keys = sorted(set().union(*dist.gather_objects(sorted(stats)))) if dist.enabled else list(stats)
    out = {}
    for k in keys:
        total = dist.sum(stats.get(k, 0.0))
        if k.endswith("_count"):
            out[k[:-6].replace("clip_low", "clip_frac_low").replace("clip_high", "clip_frac_high")] = \
                total / max(n_tokens, 1.0)
        elif k.endswith("_sum"):
            out[k[:-4]] = total / max(n_tokens, 1.0)
        else:
            out[k] = total
    return out


def reduce_means(pairs: dict, dist: "Dist") -> dict:
    """name → (sum, count) over this rank's sequences → name → global mean (None where the count is 0)."""
    keys = sorted(set().union(*dist.gather_objects(sorted(pairs)))) if dist.enabled else list(pairs)
    out = {}
    for key in keys:
        total, count = pairs.get(key, (0.0, 0.0))
        count = dist.sum(count)
        out[key] = dist.sum(total) / count if count else None
    return out


def pad_forwards(dist: "Dist", n_local: int) -> int:
    """How many empty forwards this rank must add so that every rank runs the same number (FSDP2)."""
    return int(dist.max(n_local)) - n_local if dist.fsdp else 0


def dummy_batch(pad_id: int, device) -> dict:
    """A one-token micro-batch whose loss is multiplied by 0: keeps FSDP2's collectives matched."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": 1,
            "response_mask": torch.ones((1, 1), device=device), "prompt_mask": torch.ones((1, 1), device=device)}


# ====================================================================================================
# CPU threads per process
# ====================================================================================================
# torch starts with one intra-op thread per core of the machine, in every process. Several ranks on one node
# then run ranks x cores threads on the cores, and a machine that is already busy gets threads that wait for
# each other: measured on 2 cores with one of them busy, 2 threads ran 4-10x slower than 1. So each process
# takes its share: the CPUs it may run on, divided among the ranks of its node.
#
# Why not also subtract the machine's load? The load average lags by a minute, counts processes that are
# about to finish or that sleep on I/O, and would make the thread count (and so the last bits of CPU
# results) depend on what else happened to run at start-up: not robust enough to guess with. On a busy
# machine, set OMP_NUM_THREADS yourself.


def omp_threads(value: str | None) -> int | None:
    """OMP_NUM_THREADS as a thread count: its first entry (OpenMP also accepts one per nesting level, "4,2"),
    None when unset, empty or not a positive number."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def default_torch_threads(cpus: int, local_ranks: int = 1, omp_num_threads: str | None = None) -> int:
    """Intra-op threads for one process: OMP_NUM_THREADS when it is set (the user's choice, always kept),
    else this process's CPUs shared evenly among the `local_ranks` processes of its node, at least 1.

    torchrun itself sets OMP_NUM_THREADS=1 in every rank when it starts several per node and the variable
    was unset; a rank cannot tell that 1 from a user's, so it keeps it (it never oversubscribes; set
    OMP_NUM_THREADS=N to give each rank more).
    """
    return omp_threads(omp_num_threads) or max(1, cpus // max(1, local_ranks))


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, a container's cpuset, a batch
    scheduler's allocation), not the machine's count. A CPU quota (docker --cpus) is not visible here."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS and others: no affinity mask to read


def set_torch_threads() -> int:
    """Apply `default_torch_threads` to this process and say it on rank 0; returns the number. Called once,
    where a command-line program starts (train.py, study.py, eval.py), not by library code: a caller that
    runs `train.main` in its own process (the tests, a notebook) keeps its own setting."""
    cpus, local_ranks = available_cpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    omp = omp_threads(os.environ.get("OMP_NUM_THREADS"))
    threads = default_torch_threads(cpus, local_ranks, os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    if int(os.environ.get("RANK", "0")) == 0:
        why = f"OMP_NUM_THREADS={omp}" if omp else \
            f"{cpus} CPU{'s' * (cpus != 1)}, {local_ranks} rank{'s' * (local_ranks != 1)} on this node"
        print(f"torch threads: {threads} per rank ({why})", flush=True)
    return threads


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


def report_config_error(e: Exception, grace_s: float = 5.0) -> None:
    """"error: ..." on stderr once, and leave the process group. Under torchrun every rank meets the same bad
    input: rank 0 prints it; another rank waits `grace_s` for torchrun to stop it after rank 0's exit
    (leaving then with code 2, not -15) and prints the error itself only if it is still running, i.e.
    if rank 0 did not fail the same way."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0 and world > 1:
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
        time.sleep(grace_s)
    print(f"error: {e}", file=sys.stderr)
