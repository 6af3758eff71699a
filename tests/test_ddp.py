"""Real DDP over gloo (two processes, no Ray): W workers at batch B follow one worker at W·B."""
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from rayexp.spaces import load_experiment
from rayexp.train.loop import run_training

ARGS = ["train.steps=12", "train.eval_every=6", "train.eval_batches=2", "train.log_every=3", "train.warmup=2",
        "optimizer.lr=3e-3", "train.log_block_grad_norms=false"]


def _worker(rank, world, port, tmp, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        exp = load_experiment(None, ARGS + ["train.batch_size=4", f"output_dir={tmp}", f"data.cache_dir={tmp}/cache"])
        res = run_training(exp, workdir=f"{tmp}/ddp")
        out[rank] = [(h["step"], h.get("train_loss"), h.get("val_loss")) for h in res.history]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_match_one_worker_with_doubled_batch(tmp_path):
    from tests.conftest import _free_port
    single = run_training(load_experiment(None, ARGS + ["train.batch_size=8", f"output_dir={tmp_path}",
                                                        f"data.cache_dir={tmp_path}/cache"]),
                          workdir=str(tmp_path / "single"))
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), out), nprocs=2, join=True)
    want = [(h["step"], h.get("train_loss"), h.get("val_loss")) for h in single.history]
    for rank in (0, 1):
        got = out[rank]
        assert [s for s, _, _ in got] == [s for s, _, _ in want]
        for (_, t1, v1), (_, t2, v2) in zip(got, want):
            assert (t1 is None) == (t2 is None) and (t1 is None or abs(t1 - t2) < 1e-5), (t1, t2)
            assert (v1 is None) == (v2 is None) and (v1 is None or abs(v1 - v2) < 1e-5), (v1, v2)
