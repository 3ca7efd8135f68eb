"""A tensor-parallel engine's other ranks (issue 35, first part): processes on this host that
each hold their shard of every model and their share of every KV page, and run each step's
forward pass beside rank 0 (the engine's own process, which schedules, samples and serves).

Rank 0 sends every rank the same commands in the same order (pickled into a shared file, a
command's tensors as their bytes behind the pickle, ``models/tp.py`` ``ShmCommands``; gloo
over TCP on 127.0.0.1 for a larger one): ``load`` (a
model's shard, read from its checkpoint by each rank itself, ``models/tp.py``), ``forward`` (a
step's :class:`~gpupool.models.batch.ForwardBatch`: page ids, positions, block tables; the same
on every rank, since one page pool's integers serve them all), ``copy`` (a KV swap's page
pairs: every rank moves its share), ``add_adapter`` / ``remove_adapter`` (a LoRA file each rank
reads its part of when a step first needs it: ``models/tp.py`` ``RankAdapters``), ``unload``
and ``stop``. So residency of KV pages, prefix-cache hits and preemption agree on every rank
without a second scheduler. Each rank keeps its shards in its host memory (rank 0's go
through the engine's weight pool as any model's). Limits of this first part: CPU and gloo
only (NCCL and CUDA graphs: not yet), one tensor-parallel engine per process
(torch.distributed's default group), and a rank that dies makes rank 0's next step fail
(``models/tp.py``'s waits ask whether the ranks live).

The forward pass's all-reduces and logits gathers go through a shared-memory exchange
(``models/tp.py`` ``ShmExchange``: a file in /dev/shm, each rank a slot, sequence numbers;
gloo for a tensor larger than a slot), not gloo's TCP loopback.

Run as a rank: ``python -P -m gpupool.engine.tp PORT RANK WORLD NUM_PAGES PAGE_BYTES
HOST_PAGES THREADS SHM_PATH CMD_PATH``. Under torchrun (``torchrun --nproc-per-node N
gpupool serve --tensor-parallel N``, or ``worker``): every process runs the command; rank 0
(torchrun's RANK 0) is the engine and starts no processes, the others follow it
(:func:`follow_torchrun`, called by the CLI): torch.distributed from torchrun's environment
(``env://``), rank 0's shared files and sizes broadcast, each rank's pid gathered for the
liveness checks (torchrun, not rank 0, is then every rank's parent). The shared-memory
exchange needs the ranks on one host (``--nnodes 1``).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys

import torch

logger = logging.getLogger(__name__)

SHM_SLOT_BYTES = 16 << 20  # a rank's slot in the shared-memory exchange (larger: gloo)


def _init(port: int | None, rank: int, world: int) -> None:
    """torch.distributed's gloo group: over 127.0.0.1:``port``, or (None) torchrun's
    MASTER_ADDR and MASTER_PORT."""
    import torch.distributed as dist

    from gpupool.models.tp import TIMEOUT_S  # gloo's collectives wait as long as the exchange
    dist.init_process_group("gloo", init_method="env://" if port is None
                            else f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def torchrun_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when torchrun started this process (its environment), else None.
    ValueError where its ranks do not share this host (the shared-memory exchange)."""
    env = os.environ
    if not all(k in env for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE",
                                  "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None  # (RANK and WORLD_SIZE alone are set by other launchers too)
    world = int(env["WORLD_SIZE"])
    if int(env["LOCAL_WORLD_SIZE"]) != world:
        raise ValueError("tensor-parallel ranks must share one host (they meet in shared "
                         "memory): start torchrun with --nnodes 1")
    return int(env["RANK"]), world


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another rank removed it first
        pass


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (not gone, not a zombie)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError, IndexError):
        return False
    except (PermissionError, OSError):
        return True  # it exists; its state cannot be read here


class TPRanks:
    """Ranks 1 .. world - 1 as processes; this process is rank 0."""

    def __init__(self, world: int, num_pages: int, page_bytes: int, host_pages: int,
                 threads: int):
        import torch.distributed as dist

        from gpupool.models.tp import ShmCommands, ShmExchange, TPGroup

        if dist.is_initialized():
            raise RuntimeError("one tensor-parallel engine per process (torch.distributed's "
                               "default group is taken)")
        launched = torchrun_rank()
        if launched is not None and launched != (0, world):
            raise ValueError(f"torchrun made this process rank {launched[0]} of {launched[1]}; "
                             f"tensor_parallel is {world}: rank 0 of {world} runs the engine")
        self.world = world
        self.shm_path = ShmExchange.create(world, SHM_SLOT_BYTES)
        self.cmd_path = ShmCommands.create()
        self.procs, self.pids = [], []  # our children; or torchrun's other ranks' pids
        try:
            if launched is None:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                self.procs = [subprocess.Popen(
                    [sys.executable, "-P", "-m", "gpupool.engine.tp", str(port), str(r),
                     str(world), str(num_pages), str(page_bytes), str(host_pages),
                     str(threads), self.shm_path, self.cmd_path])
                    for r in range(1, world)]
                _init(port, 0, world)
            else:  # torchrun started the ranks: tell them what rank 0's children get
                _init(None, 0, world)
                dist.broadcast_object_list([(num_pages, page_bytes, host_pages, threads,
                                             self.shm_path, self.cmd_path)], src=0)
                pids = [None] * world
                dist.all_gather_object(pids, os.getpid())
                self.pids = pids[1:]
            self.commands = ShmCommands(self.cmd_path, 0, world)
            self.group = TPGroup(0, world, shm=ShmExchange(self.shm_path, 0, world,
                                                           SHM_SLOT_BYTES))
            self.commands.alive = self.group.shm.alive = self.alive
            dist.barrier()  # every rank has mapped both files
        except BaseException:
            for p in self.procs:
                p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        finally:  # their names go (no leftovers in /dev/shm, whatever way the processes end)
            for path in (self.shm_path, self.cmd_path):
                _unlink(path)
        self.closed = False

    def alive(self) -> bool:
        """Whether every other rank's process still runs."""
        return (all(p.poll() is None for p in self.procs)
                and all(_pid_alive(pid) for pid in self.pids))

    def command(self, *msg) -> None:
        """Every other rank runs ``msg`` (rank 0 runs its own part after)."""
        self.commands.send(msg)

    def close(self) -> None:
        import torch.distributed as dist

        if self.closed:
            return
        self.closed = True
        try:
            if self.alive():
                self.command("stop")
        except RuntimeError:  # a rank died meanwhile: the others are killed below
            pass
        finally:
            for p in self.procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            dist.destroy_process_group()


def _load(models: dict, kv, msg, rank: int, world: int, shm) -> None:
    from gpupool.kernels import backend
    from gpupool.models import tp
    from gpupool.models.config import ModelConfig
    from gpupool.models.llama import LlamaModel, kv_views

    _, name, folder, dtype, quantization, kernels, use_native, invariant = msg
    dtype = getattr(torch, dtype)
    cfg = ModelConfig.from_folder(folder)
    local, layout, host = tp.load_shard(folder, cfg, dtype, world, rank, quantization)
    model = LlamaModel(local, dtype, torch.device("cpu"),
                       backend.select(torch.device("cpu"), dtype, local, kernels, use_native,
                                      invariant))
    model.bind(layout.views(host))
    model.tp = tp.TPGroup(rank, world, shm=shm)
    view = kv_views(kv, local, dtype)
    # the whole model's config, and its RankAdapters (made by its first adapter)
    models[name] = (model, view, host, [cfg, None])


def _add_adapter(entry, msg, rank: int, world: int) -> None:
    """Register an adapter of a loaded model on this rank (read when first run)."""
    from gpupool.models import tp

    model, _, _, held = entry
    _, _, name, spec, targets, dtype, ranks, host_bytes = msg
    if held[1] is None:  # pieces with a bf16 part where rank 0's have one (its condition)
        adapter_dtype = getattr(torch, dtype)
        mirror = (model.dtype == torch.bfloat16 and adapter_dtype == torch.float32
                  and model.ops.fused_lora)
        held[1] = tp.RankAdapters(held[0], model.cfg, adapter_dtype, world, rank, mirror)
    held[1].add(name, spec, targets, ranks, host_bytes)


def _forward(entry, msg) -> None:
    """A step on this rank. With adapters, every rank says (a sum over the ranks) whether
    it could read its part of them: if one could not, none runs the step and rank 0 fails
    its requests (never a rank lost over an unreadable adapter file)."""
    model, view, _, held = entry
    lora, failed = None, 0.0
    if msg[3] is not None:
        try:
            lora = held[1].batch(msg[3], model.ops, model.tp.all_reduce)
        except Exception:
            logger.exception("rank %d: the adapters of a step could not be read", model.tp.rank)
            failed = 1.0
        if float(model.tp.all_reduce(torch.tensor([failed]))[0]):
            return
    model.forward(msg[2], view, lora)


def main(argv: list[str]) -> None:
    """A rank started by rank 0: run its commands until ``stop``."""
    port, rank, world, num_pages, page_bytes, host_pages, threads = map(int, argv[:7])
    torch.set_num_threads(threads)
    _init(port, rank, world)
    parent = os.getppid()
    _follow(rank, world, num_pages, page_bytes, host_pages, argv[7], argv[8],
            lambda: os.getppid() == parent)  # rank 0 (our parent) lives


def follow_torchrun() -> None:
    """A rank > 0 that torchrun started: join rank 0 (see the module's doc) and run its
    commands until ``stop``."""
    import torch.distributed as dist

    rank, world = torchrun_rank()
    _init(None, rank, world)
    params = [None]
    dist.broadcast_object_list(params, src=0)
    num_pages, page_bytes, host_pages, threads, shm_path, cmd_path = params[0]
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    torch.set_num_threads(threads)
    leader = pids[0]
    _follow(rank, world, num_pages, page_bytes, host_pages, shm_path, cmd_path,
            lambda: _pid_alive(leader))


def _follow(rank: int, world: int, num_pages: int, page_bytes: int, host_pages: int,
            shm_path: str, cmd_path: str, alive) -> None:
    """A rank's loop (torch.distributed joined): run rank 0's commands until ``stop``;
    ``alive()``: whether rank 0 lives."""
    import torch.distributed as dist

    from gpupool.models.tp import ShmCommands, ShmExchange
    from gpupool.pool.kv import KVStorage

    shm = ShmExchange(shm_path, rank, world, SHM_SLOT_BYTES)
    commands = ShmCommands(cmd_path, rank, world)
    shm.alive = commands.alive = alive
    dist.barrier()  # every rank has mapped both files: the names can go (rank 0 removes
    for path in (shm_path, cmd_path):  # them too; whichever comes first)
        _unlink(path)
    kv = KVStorage(num_pages, page_bytes, "cpu")
    kv.enable_host_swap(host_pages)
    models: dict = {}
    try:
        while True:
            msg = commands.receive()
            op = msg[0]
            if op == "stop":
                break
            if op == "load":
                _load(models, kv, msg, rank, world, shm)
            elif op == "unload":
                models.pop(msg[1], None)
            elif op == "copy":
                kv.copy_pages(msg[1], to_host=msg[2])
            elif op == "add_adapter":
                _add_adapter(models[msg[1]], msg, rank, world)
            elif op == "remove_adapter":
                adapters = models[msg[1]][3][1]
                if adapters is not None:
                    adapters.remove(msg[2])
            elif op == "forward":
                with torch.inference_mode():
                    _forward(models[msg[1]], msg)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
