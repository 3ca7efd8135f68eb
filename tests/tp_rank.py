"""One rank of tests/test_tp.py's tensor-parallel group, run as its own process
(``python -P tests/tp_rank.py PORT RANK WORLD OUT FOLDER...``: gloo over TCP on this host;
rank 0 saves each folder's tokens and logits to OUT), and the greedy loop both sides run.
Imports only gpupool and torch (the test imports ``greedy`` from here)."""

from __future__ import annotations

import sys

import torch

PROMPTS = [[1, 5, 9, 23, 44, 2, 17], [3, 4, 5, 6]]
STEPS = 6
BLOCK = 16


def _model(folder, cfg, world=1, rank=0):
    from gpupool.models import loader, tp
    from gpupool.models.llama import LlamaModel

    if world == 1:
        local = cfg
        layout, host = loader.load_flat_weights(folder, cfg, torch.float32)
    else:
        local, layout, host = tp.load_shard(folder, cfg, torch.float32, world, rank)
    model = LlamaModel(local, torch.float32, torch.device("cpu"))
    model.bind(layout.views(host))
    if world > 1:
        model.tp = tp.TPGroup(rank, world)
    kv = torch.zeros(8, local.num_layers, 2, BLOCK, local.num_kv_heads, local.head_dim)
    return model, kv, host


def greedy(folder, world: int = 1, rank: int = 0):
    """Prefill both prompts in one step, then STEPS greedy decode steps of both rows: the
    tokens and each step's logits (on a TP rank: whole rows, gathered)."""
    from gpupool.models.batch import BatchRow
    from gpupool.models.config import ModelConfig
    from gpupool.models.runner import build_batch

    cfg = ModelConfig.from_folder(folder)
    model, kv, _host = _model(folder, cfg, world, rank)
    pages = [[1 + 2 * i, 2 + 2 * i] for i in range(len(PROMPTS))]
    seqs = [list(p) for p in PROMPTS]
    rows = [BatchRow(token_ids=p, start=0, pages=pg, is_decode=False, samples=True)
            for p, pg in zip(seqs, pages)]
    all_logits = []
    for _ in range(STEPS + 1):
        logits = model.forward(build_batch(rows, BLOCK, torch.device("cpu")), kv)
        all_logits.append(logits.clone())
        for s, t in zip(seqs, logits.argmax(-1).tolist()):
            s.append(t)
        rows = [BatchRow(token_ids=[s[-1]], start=len(s) - 1, pages=pg, is_decode=True,
                         samples=True) for s, pg in zip(seqs, pages)]
    return [s[len(p):] for s, p in zip(seqs, PROMPTS)], all_logits


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    port, rank, world, out, *folders = argv
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = {f: greedy(f, world, rank) for f in folders}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
