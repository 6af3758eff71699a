"""Curvature over Ray actors that form one torch.distributed group (docs/methods.md "Distribution").

N ``HessianWorker`` actors join a process group (NCCL when each holds a whole GPU of its own, else gloo)
and run the very task code of ``rayexp.hessian.analyze`` SPMD: every actor builds an ``Operator`` over its
contiguous share of the fixed batches, with

- ``shard=data``: the whole model on every actor; vectors replicated; Hv = all-reduce of the shards' sums;
- ``shard=params``: every actor keeps 1/N of θ and of every vector (Lanczos vectors and bases, probes,
  Hutchinson sums, the 1-1 norm's per-row samples); a product all-gathers θ and v, applies its shard's
  H_s, and keeps its slice of the summed Hv; dot products are local sums plus an all-reduce.

The driver sends the model and batches once (Ray's object store), then only calls; scalars and final
results (rank 0's metrics and arrays) come back, never a vector per product. Probes are keyed by
(seed, kind, index, chunk), so results do not depend on N or the sharding (up to summation order).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from contextlib import contextmanager
from typing import Optional, Sequence

import ray
import torch
import torch.distributed as dist

from rayexp.config import ConfigError, HessianConfig

READY_TIMEOUT_S = 120


@contextmanager
def _ray_in_its_own_process_group():
    """Ray's processes (GCS, raylet, and the workers the raylet forks) start in a process group of their own.

    They inherit the driver's group otherwise, and a signal to that group (a service manager's or a CI
    timeout's SIGTERM; Ray's processes block only SIGINT) ends the GCS and raylet under the driver: Tune's
    clean-up then waited 60 s for the GCS before Ray aborted the driver with exit 1, or the driver's core
    worker exited at once on the dead raylet, leaving the MLflow runs RUNNING. Away from the group, only the
    driver gets the signal and stops in order, as on ``kill PID``. Ray's kernel fate-sharing (the
    parent-death signal) still ends them with the driver. Ray starts them through ``services.ConsolePopen``.
    """
    from ray._private import services

    base = services.ConsolePopen

    class OwnGroupPopen(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, process_group=0, **kwargs)

    services.ConsolePopen = OwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = base


def ensure_ray(logging_level: int = logging.ERROR) -> bool:
    """Start a local Ray (or join ``RAY_ADDRESS``) unless one is running; returns whether we started it.

    The one way rayexp starts Ray (sweeps too). A new local Ray keeps token authentication on (ray 2.60's
    default for ``ray.init()``) with the mode set explicitly, as Ray does itself for that default, so that it
    does not warn "Token authentication is enabled"; ``RAY_AUTH_MODE`` from the environment wins, and a real
    cluster (``RAY_ADDRESS``) keeps its own."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None and "RAY_AUTH_MODE" not in os.environ:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray's own refresh after setting the mode (authentication_token_setup.py)
    with _ray_in_its_own_process_group():
        ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level=logging_level)
    return True


def actor_resources(cfg: HessianConfig, use_gpu: bool) -> tuple[float, float]:
    """(CPUs, GPUs) per actor: the config's, else an equal share of the cluster (at most 1 each);
    a request the cluster cannot meet is a ConfigError naming the setting."""
    total = ray.cluster_resources()
    cpus_all, gpus_all = total.get("CPU", 0.0), total.get("GPU", 0.0) if use_gpu else 0.0
    cpus = cfg.cpus_per_actor or min(1.0, cpus_all / cfg.actors)
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else min(1.0, gpus_all / cfg.actors)
    if cfg.actors * cpus > cpus_all + 1e-9:
        raise ConfigError(f"hessian.cpus_per_actor={cpus:g} × hessian.actors={cfg.actors} needs {cfg.actors * cpus:g} CPUs; "
                          f"the Ray cluster has {cpus_all:g}")
    if cfg.actors * gpus > gpus_all + 1e-9:
        raise ConfigError(f"hessian.gpus_per_actor={gpus:g} × hessian.actors={cfg.actors} needs {cfg.actors * gpus:g} GPUs; "
                          f"the Ray cluster has {gpus_all:g}")
    return cpus, gpus


def _split(n: int, world: int) -> list[list[int]]:
    """Contiguous, balanced shares of n batch ids (empty shares when world > n)."""
    cuts = [round(i * n / world) for i in range(world + 1)]
    return [list(range(cuts[r], cuts[r + 1])) for r in range(world)]


@ray.remote
class HessianWorker:
    """One member of the group: its data shard, its parameter shard (``params``), the task loop."""

    def __init__(self, rank: int, world: int, cfg: HessianConfig, whole_gpu: bool):
        self.rank, self.world, self.cfg = rank, world, cfg
        self.gpu = torch.cuda.is_available() and cfg.device != "cpu"
        self.backend = "nccl" if self.gpu and whole_gpu else "gloo"
        self.op, self.ctx = None, None
        if not self.gpu:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port for the group's rendezvous (rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, addr: tuple[str, int], source) -> tuple[str, int]:
        """Join the group, build this shard's operator and agree on one memory plan; returns its text and HVPs."""
        from rayexp.hessian.plan import build_operator, prepare
        from rayexp.hessian.operator import Comm
        device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        if self.gpu:
            torch.cuda.set_device(device)
        dist.init_process_group(self.backend, init_method=f"tcp://{addr[0]}:{addr[1]}", rank=self.rank,
                                world_size=self.world, timeout=datetime.timedelta(minutes=30))
        model, loss_fn, batches, self.train_rotation = source
        comm = Comm(self.cfg.shard, dist.group.WORLD)
        ids = _split(len(batches), self.world)[self.rank]
        theta_fn = None
        if self.cfg.shard == "params":
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(device)
            d = flat.numel()
            self.theta = flat[comm.span(d)].clone()  # this actor's 1/N of θ, kept
            del flat
            theta_fn = lambda: comm.gather(self.theta, d)  # noqa: E731
        self.op = build_operator(model, [batches[i] for i in ids], self.cfg, loss_fn, comm, len(batches), ids,
                                 theta_fn, device)
        if theta_fn is not None:
            for p in self.op.products.model.parameters():
                p.data = torch.empty(0, device=p.device)  # the full θ lives only in a product's gather
        return self._agreed_plan(prepare)

    def _agreed_plan(self, prepare) -> tuple[str, int]:
        """``prepare`` on every rank; one rank's ConfigError stops all, chunks are the minimum over ranks."""
        err = None
        try:
            self.ctx, plan = prepare(self.op, self.cfg, self.train_rotation)
        except ConfigError as e:
            err, plan = e, None
        flag = torch.tensor([1.0 if err else 0.0])
        dist.all_reduce(flag)
        if flag.item():
            raise err or ConfigError("hessian: another actor's memory plan does not fit (see its error)")
        names = sorted(plan.chunk)
        chunks = torch.tensor([float(plan.chunk[n]) for n in names])
        dist.all_reduce(chunks, op=dist.ReduceOp.MIN)
        self.ctx.chunk = plan.chunk = {n: int(c) for n, c in zip(names, chunks.tolist())}
        return plan.text(), sum(plan.hvps.values())

    def run(self) -> Optional[dict]:
        """Run the tasks; rank 0 returns the metrics and arrays."""
        from rayexp.hessian.plan import run_tasks
        run_tasks(self.ctx)
        return {"metrics": self.ctx.metrics, "arrays": self.ctx.arrays} if self.rank == 0 else None

    def count(self) -> int:
        return self.op.count if self.op is not None else 0

    def memory(self) -> dict:
        """What this actor keeps: parameters (numel), its share of every d-vector, peak device bytes."""
        theta = self.theta.numel() if self.cfg.shard == "params" else self.op.d
        peak = torch.cuda.max_memory_allocated() if self.gpu else float("nan")
        return {"rank": self.rank, "params": theta, "vector": self.op.span.stop - self.op.span.start,
                "d": self.op.d, "batches": self.op.products.n_batches, "peak_bytes": peak}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _unwrap(e: Exception) -> Exception:
    """The ConfigError inside a Ray task error, if that is what it is."""
    cause = getattr(e, "cause", None)
    return ConfigError(str(cause)) if isinstance(cause, ConfigError) else e


def analyze_sharded(model, batches: Sequence, cfg: HessianConfig, loss_fn=None, progress: bool = True,
                    echo=None, train_rotation=None) -> dict:
    """``analyze`` over ``cfg.actors`` Ray actors (see the module docstring); same return value."""
    from rayexp.hessian.io import Progress
    started = ensure_ray()
    t0 = time.perf_counter()
    workers = []
    try:
        use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        cpus, gpus = actor_resources(cfg, use_gpu)
        workers = [HessianWorker.options(num_cpus=cpus, num_gpus=gpus, max_concurrency=2).remote(
            r, cfg.actors, cfg, gpus >= 1) for r in range(cfg.actors)]
        try:
            addr = ray.get(workers[0].address.remote(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"hessian.actors={cfg.actors}: the actors did not start within {READY_TIMEOUT_S} s "
                              f"({cpus:g} CPUs, {gpus:g} GPUs each); lower hessian.cpus_per_actor/gpus_per_actor") from None
        source = ray.put((model.cpu(), loss_fn, list(batches), train_rotation))
        try:
            plan, total = ray.get([w.setup.remote(addr, source) for w in workers])[0]
            if echo:
                echo(plan + f"\n  on {cfg.actors} actors, shard={cfg.shard}")
            with Progress(lambda: ray.get(workers[0].count.remote()), total, progress):
                out = ray.get([w.run.remote() for w in workers])[0]
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
        memory = ray.get([w.memory.remote() for w in workers])
        hvps = ray.get(workers[0].count.remote())
    finally:
        for w in workers:
            ray.kill(w)
        if started:
            ray.shutdown()
    return {**out, "hvps": hvps, "seconds": time.perf_counter() - t0, "tasks": list(cfg.tasks), "plan": plan,
            "actors": memory}
