"""Two ranks over gloo (CPU): each rank's agent sends with its own rank (DDP, FSDP2); DataLoader workers fork
safely."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, scrape, start_collector, value, wait_until
from tiny_models import VOCAB, tiny_model

import grokwatch.agent as gw

pytestmark = pytest.mark.slow


def _spawn_two_ranks(rank_main, *args) -> list:
    """Runs ``rank_main(rank, 2, port, endpoint, *args)`` on two gloo ranks; what they sent, decoded."""
    import zmq

    from grokwatch.wire import decode

    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    messages = []
    try:
        mp.spawn(rank_main, args=(2, free_port(), f"tcp://127.0.0.1:{port}", *args), nprocs=2, join=True)
        while sink.poll(1000):
            messages.append(decode(sink.recv()))
    finally:
        sink.close(0)
        ctx.term()
    return messages


def _train(model, rank: int, steps: int) -> None:
    """SGD steps on two rows of 8 tokens, different on each rank."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(rank * 100 + step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _rank_main(rank: int, world: int, port: int, endpoint: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(tiny_model("olmoe", seed=0))
        mon = gw.attach(model, endpoint, "ddp", every_n_steps=1, max_samples_per_step=2)  # the DDP wrapper
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for step in range(3):
            ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(rank * 100 + step))
            mon.tag([f"r{rank}s{step}a", f"r{rank}s{step}b"], ["g", "g"])
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        mon.close()
        assert mon.rank == rank and mon.world_size == world
    finally:
        dist.destroy_process_group()


def test_every_rank_sends_under_its_own_rank(tmp_path):
    collector = start_collector(tmp_path)
    try:
        mp.spawn(_rank_main, args=(2, free_port(), collector.endpoints[0]), nprocs=2, join=True)
        wait_until(lambda: collector.state.samples_total == 2 * 3 * 2)
        senders = collector.state.senders.values()
        assert sorted(info.rank for info in senders) == [0, 1]
        assert all(info.hello["world_size"] == 2 for info in senders)
        s = scrape(collector.metrics_port)
        for rank in (0, 1):
            assert value(s, "grokwatch_agent_messages_sent_total", run="ddp", rank=rank) >= 4
    finally:
        collector.stop()


def _late_init_rank_main(rank: int, world: int, port: int, endpoint: str) -> None:
    model = tiny_model("olmoe", seed=0)
    mon = gw.attach(model, endpoint, "late", every_n_steps=1, max_samples_per_step=2)  # before init_process_group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(model)
        _train(model, rank, steps=2)
        mon.close()
    finally:
        dist.destroy_process_group()


def test_ranks_initialized_after_attach_are_learned(tmp_path):
    """attach() before init_process_group: each rank must still send under its own rank, with untagged
    ids that carry it; else both ranks ship rank 0 and the same ids ("0:0") for different samples, and
    the collector, which follows samples by id, merges them."""
    from grokwatch.wire import Hello, Routing

    messages = _spawn_two_ranks(_late_init_rank_main)
    routing = [m for m in messages if isinstance(m, Routing)]
    assert sorted((m.rank, m.step, tuple(m.sample_ids)) for m in routing) == [
        (r, s, (f"{s}:{r}:0", f"{s}:{r}:1")) for r in (0, 1) for s in range(2)]
    assert sorted((m.rank, m.world_size) for m in messages if isinstance(m, Hello)) == [(0, 1), (0, 1), (0, 2), (1, 2)]


class _Ids(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(i))


def test_dataloader_workers_fork_safely_while_attached(tmp_path):
    collector = start_collector(tmp_path)
    try:
        model = tiny_model("olmoe")
        mon = gw.attach(model, collector.endpoints[0], "fork", every_n_steps=1)
        loader = torch.utils.data.DataLoader(_Ids(), batch_size=4, num_workers=2,
                                             multiprocessing_context="fork")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for ids in loader:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        stats = mon.stats()
        mon.close()
        assert stats["hook_errors"] == 0 and not stats["disabled"]
        wait_until(lambda: collector.state.samples_total == 16)
    finally:
        collector.stop()


def _fsdp_rank_main(rank: int, world: int, port: int, endpoint: str, compile_reduction: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_model("olmoe", seed=0)
        for layer in model.model.layers:
            fully_shard(layer)  # each decoder layer unsharded for its forward, resharded (freed) after it
        fully_shard(model)
        mon = gw.attach(model, endpoint, "fsdp", every_n_steps=1, max_samples_per_step=2,
                        compile_reduction=compile_reduction)
        _train(model, rank, steps=3)
        stats = mon.stats()
        mon.close()
        assert stats["hook_errors"] == 0 and stats["dropped"] == {}, stats
        assert stats["reduction"] == ("compiled" if compile_reduction else "op by op"), stats
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compile_reduction", [False, True])
def test_fsdp2_sharded_routers_ship_summaries_with_their_cosines(compile_reduction):
    """FSDP2 (fully_shard): at attach the router weights are sharded DTensors, during a layer's forward
    plain unsharded parameters, freed when the layer reshards. The cosines must use this forward's
    weights (step 0: the initial ones, the same on every rank), never a DTensor or freed memory.
    Compiled too: FSDP training runs on GPUs, where the reduction is compiled by default."""
    from grokwatch.wire import Routing

    messages = [m for m in _spawn_two_ranks(_fsdp_rank_main, compile_reduction) if isinstance(m, Routing)]
    assert sorted((m.rank, m.step) for m in messages) == [(r, s) for r in (0, 1) for s in range(3)]
    assert all(m.adj_cosine_NJ is not None for m in messages)
    weights = [layer.weight_EH.detach().double() for layer in gw.discover(tiny_model("olmoe", seed=0)).layers]
    for m in (m for m in messages if m.step == 0):
        emb = torch.stack([torch.tensor(m.mean_probs_NLE[:, i], dtype=torch.float64) @ w for i, w in enumerate(weights)], 1)
        expected = torch.nn.functional.cosine_similarity(emb[:, :-1], emb[:, 1:], dim=-1)
        torch.testing.assert_close(torch.tensor(m.adj_cosine_NJ, dtype=torch.float64), expected, rtol=1e-4, atol=1e-5)
