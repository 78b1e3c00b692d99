"""Data-parallel serving: N engine ranks as processes behind one front end
(``LLM(..., data_parallel_size=N)``).

Mode ``"replicas"``: every rank is a spawned process running its own ``LLMEngine`` (its own
KV cache and prefix cache; with ``capture_routing`` its own capture buffer and shared-memory
segment ``rollout.shm.segment_name(instance_id, rank)``), joined in a ``torch.distributed``
group (gloo on CPU, NCCL on CUDA, one GPU per rank). Each rank routes its own tokens (the local
case of DESIGN.md "Data parallelism and capture"), so a request's rows are exactly those a
single-rank engine computes for it.

Mode ``"dp_attention"`` (the naive-dispatch case of DESIGN.md): each rank still runs its own
scheduler, KV cache and attention on its own requests, but its MoE layers all-gather the tokens
of all ranks, route them, compute this rank's 1/N slice of the experts and reduce-scatter the
sum (``rollout.layers.moe.NaiveDispatch``); shared experts and everything outside the MoE blocks
stay on the rank's own tokens. A rank holds the weights of its slice of the experts only
(loaded, allocated and updated: ``rollout.models.decoder`` under ``MoEParallelConfig``), so the
experts' memory is split across the ranks. Each rank's capture buffer takes its own tokens' rows of the
routed batch (the capturer's DP rule), so a request's rows are again those a single-rank engine
computes for it. Every forward is collective, so the ranks step in lockstep: before each step
they all-reduce "has work", and while any rank has work every rank forwards (one without work a
padding token, ``ModelRunner.run_idle``). It runs eager (no CUDA graphs: the collectives change
shape every step). ``num_experts`` must be a multiple of ``data_parallel_size`` (checked before
any rank starts).

The front end talks to each rank over a pipe, one command at a time per rank, all ranks in
parallel::

    generate: assign requests (least loaded) -> "add" to every rank -> "run" on every rank
              (replicas: the ranks that got requests; dp_attention: all, in lockstep until
              none has work) -> outputs in prompt order (each rank ships a request's rows
              with its output; the rank's output path read them from its own store)
    update_weights: "update_weights" to every rank; rank 0 gets the tensors and broadcasts
              them to the others through the process group, one tensor at a time, each rank
              copying what it holds (dp_attention: its experts' rows) as it arrives; the
              parameters reported written are those written completely on every rank
    sleep / wake_up: "sleep" / "wake_up" to every rank (each releases / rebuilds its own KV
              cache and CUDA graphs, ``LLMEngine.sleep``); ``generate`` refuses while asleep

A rank replies ``("ok", value)`` or ``("error", exception, traceback text)``; the front end
collects every rank's reply before raising the first error, so ranks stay in step. A rank that
dies is reported by its exit code. With dp_attention a rank's error during "run" shuts every
rank down at once (the others may wait in a collective of the failed step forever); the
exception is raised. ``shutdown`` (also on a failed start, on an interrupted
``generate``, on garbage collection and at exit) stops every rank: it shuts its engine down
(unlinking its segment) and leaves the group; a rank that does not stop in time is terminated
(its SIGTERM handler still runs that cleanup) and its segment name unlinked by the front end.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import traceback
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from rollout import shm
from rollout.capture import ReaderSpec
from rollout.config import EngineConfig
from rollout.engine.llm_engine import LLMEngine
from rollout.layers.moe import expert_slice
from rollout.loader import load_hf_config, load_tokenizer
from rollout.models.registry import model_class
from rollout.outputs import EngineStats, RequestOutput, RoutingSpec
from rollout.sampling_params import SamplingParams

__all__ = ["DataParallelEngine"]

logger = logging.getLogger(__name__)

# Seconds a rank gets to shut its engine down before it is terminated.
_STOP_TIMEOUT_S = 30.0


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class _RankInfo:
    """What a rank reports once its engine is built."""

    routing_spec: RoutingSpec
    vocab_size: int
    reader_spec: ReaderSpec | None
    parameter_names: frozenset[str]


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class _BadRequest:
    """A rank's reply to "add" when its ``position``-th request was refused (none was kept)."""

    position: int
    error: Exception


class DataParallelEngine:
    """The front end of ``config.data_parallel_size`` engine ranks (processes).

    Duck-types the parts of ``LLMEngine`` that ``rollout.LLM`` uses (``tokenizer``,
    ``vocab_size``, ``routing_spec``, ``routing_reader_spec``, ``stats``, ``update_weights``,
    ``is_sleeping``, ``sleep``, ``wake_up``, ``shutdown``) and adds ``generate``,
    ``parameter_names`` (the model's parameter names, the same on every rank: what a full
    ``update_weights`` writes) and ``parameter_shapes`` (per rank).

    Args:
        config: the engine settings; ``data_parallel_size`` >= 2.
        instance_id: names the ranks' segments (``segment_name(instance_id, rank)``); None
            draws a fresh one.

    Raises:
        ValueError: ``data_parallel_size`` < 2, ``device`` naming one CUDA device, or with
            ``dp_attention`` a ``num_experts`` that is not a multiple of ``data_parallel_size``.
        RuntimeError / the rank's exception: a rank failed to start (every rank is stopped).
    """

    def __init__(self, config: EngineConfig, *, instance_id: str | None = None) -> None:
        size = config.data_parallel_size
        if size < 2:
            raise ValueError(
                f"data_parallel_size: expected >= 2 for DataParallelEngine, got {size}"
            )
        if config.device is not None and config.device.startswith("cuda:"):
            raise ValueError(
                "device: expected None, 'cpu' or 'cuda' with data_parallel_size > 1 "
                f"(rank r uses cuda:r), got {config.device!r}"
            )
        if config.dp_attention:
            _check_expert_split(config)
        self.config = config
        self.instance_id = shm.new_instance_id() if instance_id is None else instance_id
        self.segment_names = tuple(shm.segment_name(self.instance_id, r) for r in range(size))
        self.tokenizer = load_tokenizer(config.model)
        self._next_request_id = 0
        self._sleeping = False
        self._rendezvous_dir = tempfile.mkdtemp(prefix=f"{shm.SEGMENT_PREFIX}-dp-")
        context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        # Registered before any rank starts: a failed start, gc or exit stop what did start.
        self._finalizer = weakref.finalize(
            self,
            _stop_ranks,
            self._processes,
            self._conns,
            self.segment_names,
            self._rendezvous_dir,
        )
        try:
            init_method = f"file://{os.path.join(self._rendezvous_dir, 'rendezvous')}"
            for rank in range(size):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_rank_main,
                    args=(rank, config, self.instance_id, init_method, child),
                    name=f"rollout-dp{rank}",
                    daemon=True,
                )
                process.start()
                child.close()
                self._processes.append(process)
                self._conns.append(parent)
            infos: list[_RankInfo] = self._gather(range(size))
        except BaseException:
            self.shutdown()
            raise
        self.routing_spec = infos[0].routing_spec
        self.vocab_size = infos[0].vocab_size
        self.parameter_names = infos[0].parameter_names
        self.routing_reader_specs: tuple[ReaderSpec, ...] = tuple(
            info.reader_spec for info in infos if info.reader_spec is not None
        )
        logger.info(
            "%d data-parallel ranks ready (%s), routing capture: %s",
            size,
            config.data_parallel_mode,
            ", ".join(spec.name for spec in self.routing_reader_specs) or "off",
        )

    @property
    def data_parallel_size(self) -> int:
        """The number of ranks."""
        return self.config.data_parallel_size

    @property
    def routing_reader_spec(self) -> ReaderSpec | None:
        """None without ``capture_routing``; with it there is one store per rank: raises
        RuntimeError pointing to ``routing_reader_specs``."""
        if not self.routing_reader_specs:
            return None
        raise RuntimeError(
            "routing_reader_spec: expected a single-rank engine, got "
            f"data_parallel_size={self.data_parallel_size} (one store per rank: use "
            "routing_reader_specs)"
        )

    @property
    def stats(self) -> EngineStats:
        """The ranks' counters summed (KV blocks, preemptions, prefix-cache tokens); block size,
        context length and CUDA graph sizes are rank 0's (the same on every rank)."""
        per_rank: list[EngineStats] = self._command(range(self.data_parallel_size), ("stats",))
        return dataclasses.replace(
            per_rank[0],
            num_kv_blocks=sum(s.num_kv_blocks for s in per_rank),
            num_preemptions=sum(s.num_preemptions for s in per_rank),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in per_rank),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in per_rank),
        )

    def parameter_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Each rank's model parameters, name -> shape, in rank order (with dp_attention the
        fused expert parameters hold ``num_experts / data_parallel_size`` experts)."""
        return self._command(range(self.data_parallel_size), ("parameter_shapes",))

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every request (token ids checked by the caller); outputs in request
        order with front-end request ids (increasing over the engine's life).

        Requests go to the least-loaded rank (prompt + ``max_tokens`` tokens assigned so far,
        ties to the lowest rank). Seeded and greedy requests give what a single-rank engine
        gives them; an unseeded sampled request draws from its rank's generator.

        Raises:
            ValueError: a request a rank refuses, as ``prompts[i]: ...`` (nothing is generated).
            Any rank's exception during the run, after every rank finished (the failing rank
            aborted its requests); with dp_attention at once, every rank being shut down. An
            interruption of the front end (KeyboardInterrupt) stops every rank and leaves the
            engine shut down.
        """
        assert len(prompt_token_ids) == len(params)
        if self._sleeping:
            raise RuntimeError("generate: engine is asleep: call wake_up()")
        size = self.data_parallel_size
        load = [0] * size
        assigned: list[list[int]] = [[] for _ in range(size)]
        for i, (tokens, p) in enumerate(zip(prompt_token_ids, params, strict=True)):
            rank = min(range(size), key=load.__getitem__)
            assigned[rank].append(i)
            load[rank] += len(tokens) + p.max_tokens
        busy = [r for r in range(size) if assigned[r]]
        try:
            for r in busy:
                batch = [(list(prompt_token_ids[i]), params[i]) for i in assigned[r]]
                self._conns[r].send(("add", batch))
            added = dict(zip(busy, self._gather(busy), strict=True))
            refused = {r: reply for r, reply in added.items() if isinstance(reply, _BadRequest)}
            if refused:
                kept = [r for r in busy if r not in refused]
                for r in kept:
                    self._conns[r].send(("abort", added[r]))
                self._gather(kept)
                rank, bad = min(refused.items(), key=lambda kv: assigned[kv[0]][kv[1].position])
                index = assigned[rank][bad.position]
                raise ValueError(f"prompts[{index}]: {bad.error}") from bad.error
            # dp_attention: every rank steps, in lockstep, until none has work.
            runners = list(range(size)) if self.config.dp_attention else busy
            for r in runners:
                self._conns[r].send(("run",))
            with tqdm(total=len(params), desc="generate", unit="req", disable=not use_tqdm) as bar:
                finished = self._gather_run(runners, lambda r: bar.update(len(assigned[r])))
        except (KeyboardInterrupt, EOFError, OSError):
            self.shutdown()
            raise
        outputs: list[RequestOutput | None] = [None] * len(params)
        first_id = self._next_request_id
        self._next_request_id += len(params)
        for r, rank_outputs in zip(runners, finished, strict=True):
            for i, out in zip(assigned[r], rank_outputs, strict=True):
                outputs[i] = dataclasses.replace(out, request_id=first_id + i)
        return outputs  # type: ignore[return-value]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into every rank's model (rank 0 broadcasts them through the
        process group, one at a time; each rank copies what it holds) and reset every rank's
        prefix cache.

        Returns the names of the model parameters written completely on every rank (with
        dp_attention: each rank's experts of them; a full state dict writes every parameter
        on every rank).

        Raises:
            TypeError: a name not a str or a tensor not a ``torch.Tensor``.
            ValueError: an unknown name or a mis-shaped tensor (from the ranks).
        """
        items = []
        for i, item in enumerate(named_tensors):
            name, tensor = item
            if not isinstance(name, str):
                raise TypeError(
                    f"named_tensors[{i}]: expected a str name, got {type(name).__name__}"
                )
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
            # Through the pipe as host memory: CUDA IPC handles would tie rank 0 to our device.
            items.append((name, tensor.detach().to("cpu").contiguous()))
        self._conns[0].send(("update_weights", items))
        for r in range(1, self.data_parallel_size):
            self._conns[r].send(("update_weights", None))
        written: list[set[str]] = self._gather(range(self.data_parallel_size))
        return set.intersection(*written)

    @property
    def is_sleeping(self) -> bool:
        """Whether ``sleep`` released the ranks' KV caches (until ``wake_up``)."""
        return self._sleeping

    def sleep(self) -> None:
        """Every rank releases its KV cache, CUDA graphs and attention workspaces
        (``LLMEngine.sleep``). A no-op when already asleep. After a rank's error the engine
        counts as awake; calling again is safe (a rank already asleep does nothing).

        Raises:
            RuntimeError: a rank holds unfinished requests (never between ``generate`` calls).
        """
        if not self._sleeping:
            self._command(range(self.data_parallel_size), ("sleep",))
            self._sleeping = True

    def wake_up(self) -> None:
        """Every rank rebuilds its KV cache and CUDA graphs (``LLMEngine.wake_up``). A no-op
        when awake. After a rank's error (e.g. out of memory) the engine counts as asleep;
        calling again is safe (a rank already awake does nothing)."""
        if self._sleeping:
            self._command(range(self.data_parallel_size), ("wake_up",))
            self._sleeping = False

    def shutdown(self) -> None:
        """Stop every rank: engines shut down, segments unlinked, group left (idempotent)."""
        self._finalizer()

    # ------------------------------------------------------------------ the pipes

    def _command(self, ranks: Iterable[int], message: tuple[Any, ...]) -> list[Any]:
        ranks = list(ranks)
        for r in ranks:
            self._conns[r].send(message)
        return self._gather(ranks)

    def _gather_run(self, ranks: list[int], on_reply) -> list[Any]:
        """The replies to "run". With dp_attention a rank's error stops every rank at once:
        the others may wait in a collective of the failed step forever."""
        if not self.config.dp_attention:
            return self._gather(ranks, on_reply=on_reply)
        try:
            return self._gather(ranks, on_reply=on_reply, fail_fast=True)
        except Exception:
            logger.error("a rank failed in a dp_attention step: stopping every rank")
            self.shutdown()
            raise

    def _gather(self, ranks: Iterable[int], on_reply=None, fail_fast: bool = False) -> list[Any]:
        """One reply from each of ``ranks`` (as they come); the first rank error is raised once
        all replied, or as soon as it comes with ``fail_fast``."""
        ranks = list(ranks)
        replies: dict[int, tuple[Any, ...]] = {}
        waiting = {self._conns[r]: r for r in ranks}
        waiting.update({self._processes[r].sentinel: r for r in ranks})
        while len(replies) < len(ranks):
            for ready in multiprocessing.connection.wait(list(waiting)):
                r = waiting[ready]
                if r in replies:
                    continue
                conn = self._conns[r]
                if not conn.poll():
                    raise RuntimeError(
                        f"data parallel rank {r}: expected a reply, the process exited with "
                        f"code {self._processes[r].exitcode}"
                    )
                replies[r] = conn.recv()
                if fail_fast:
                    _raise_if_error(r, replies[r])
                if on_reply is not None:
                    on_reply(r)
        for r in ranks:
            _raise_if_error(r, replies[r])
        return [replies[r][1] for r in ranks]


def _raise_if_error(rank: int, reply: tuple[Any, ...]) -> None:
    if reply[0] == "error":
        _, error, trace = reply
        raise error from RuntimeError(f"data parallel rank {rank}:\n{trace}")


def _stop_ranks(
    processes: list[multiprocessing.process.BaseProcess],
    conns: list[multiprocessing.connection.Connection],
    segment_names: tuple[str, ...],
    rendezvous_dir: str,
) -> None:
    """Ask every rank to stop, wait, terminate the stragglers and unlink what they left."""
    for conn in conns:
        try:
            conn.send(("shutdown",))
        except OSError:
            pass  # the rank is gone already
    for rank, process in enumerate(processes):
        process.join(_STOP_TIMEOUT_S)
        if process.is_alive():
            logger.warning("data parallel rank %d did not stop in time: terminating it", rank)
            process.terminate()
            process.join(_STOP_TIMEOUT_S)
        if process.exitcode != 0:
            # A rank that died without its cleanup leaves its segment behind.
            shm.unlink_if_present(segment_names[rank])
    for conn in conns:
        conn.close()
    shutil.rmtree(rendezvous_dir, ignore_errors=True)


# ---------------------------------------------------------------------- the rank process


def _rank_main(
    rank: int,
    config: EngineConfig,
    instance_id: str,
    init_method: str,
    conn: multiprocessing.connection.Connection,
) -> None:
    """A rank's process: join the group, build the engine, serve commands until "shutdown"."""
    # SIGTERM (terminate) unwinds through the finally blocks: the engine unlinks its segment.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    size = config.data_parallel_size
    on_cuda = config.device == "cuda" or (config.device is None and torch.cuda.is_available())
    engine: LLMEngine | None = None
    try:
        if on_cuda:
            config = dataclasses.replace(config, device=f"cuda:{rank}")
            torch.cuda.set_device(rank)
        else:
            # The ranks share the host's cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        dist.init_process_group(
            "nccl" if on_cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=size,
        )
        engine = LLMEngine(config, instance_id=instance_id, dp_rank=rank)
        conn.send(
            (
                "ok",
                _RankInfo(
                    routing_spec=engine.routing_spec,
                    vocab_size=engine.vocab_size,
                    reader_spec=engine.routing_reader_spec,
                    parameter_names=engine.parameter_names,
                ),
            )
        )
        _serve(
            engine,
            conn,
            torch.device(config.device) if on_cuda else torch.device("cpu"),
        )
    except BaseException as exc:
        _reply_error(conn, exc)
        if not isinstance(exc, Exception):
            raise
    finally:
        if engine is not None:
            engine.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _serve(
    engine: LLMEngine, conn: multiprocessing.connection.Connection, device: torch.device
) -> None:
    handlers = {
        "add": lambda batch: _add(engine, batch),
        "abort": lambda ids: _abort(engine, ids),
        "run": lambda: _run(engine, device),
        "stats": lambda: engine.stats,
        "parameter_shapes": lambda: {
            name: tuple(p.shape) for name, p in engine.runner.model.named_parameters()
        },
        "update_weights": lambda items: _update_weights(engine, items, device),
        "sleep": engine.sleep,
        "wake_up": engine.wake_up,
    }
    while True:
        command, *args = conn.recv()
        if command == "shutdown":
            return
        try:
            reply = ("ok", handlers[command](*args))
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the front end
            _reply_error(conn, exc)
            continue
        conn.send(reply)


def _add(
    engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]]
) -> list[int] | _BadRequest:
    ids: list[int] = []
    for position, (tokens, params) in enumerate(batch):
        try:
            ids.append(engine.add_request(tokens, params))
        except ValueError as exc:
            _abort(engine, ids)
            return _BadRequest(position=position, error=exc)
    return ids


def _abort(engine: LLMEngine, request_ids: list[int]) -> None:
    for request_id in request_ids:
        engine.abort_request(request_id)


def _run(engine: LLMEngine, device: torch.device) -> list[RequestOutput]:
    """Step until every queued request finished; outputs in the order they were added.

    With dp_attention every rank steps until no rank has work: a rank whose own requests are
    done (or that got none) runs idle steps, joining the MoE layers' collectives of the others.
    """
    outputs: dict[int, RequestOutput] = {}
    try:
        while _has_work(engine, device):
            if not engine.has_unfinished():
                engine.runner.run_idle()
                continue
            for out in engine.step():
                outputs[out.request_id] = out
    except BaseException:
        for seq in [*engine.scheduler.waiting, *engine.scheduler.running]:
            engine.abort_request(seq.seq_id)
        raise
    return [outputs[i] for i in sorted(outputs)]


def _has_work(engine: LLMEngine, device: torch.device) -> bool:
    """Whether to step again: this rank has unfinished requests; with dp_attention whether any
    rank has (an all-reduce that every rank makes before each step)."""
    busy = engine.has_unfinished()
    if not engine.config.dp_attention:
        return busy
    flag = torch.tensor([int(busy)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _check_expert_split(config: EngineConfig) -> None:
    """Raise before any rank starts what every rank would: with dp_attention each rank computes
    ``num_experts / data_parallel_size`` experts (``rollout.layers.moe.expert_slice``)."""
    hf_config = load_hf_config(config.model)
    routing = model_class(hf_config.architectures).args_from_config(hf_config).routing
    expert_slice(routing.num_experts, 0, config.data_parallel_size)


def _update_weights(
    engine: LLMEngine,
    items: list[tuple[str, torch.Tensor]] | None,
    device: torch.device,
) -> set[str]:
    """``engine.update_weights`` with rank 0's ``items`` (None on the other ranks), received
    one tensor at a time. A rank whose update stops early (an error) still joins every
    remaining broadcast, so the ranks never wait on each other forever."""
    tensors = _broadcast(items, device)
    try:
        return engine.update_weights(tensors)
    finally:
        for _ in tensors:
            pass


def _broadcast(
    items: list[tuple[str, torch.Tensor]] | None, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 0's ``items`` on every rank: names, shapes and dtypes as one object, then each
    tensor as it is consumed (on ``device``: NCCL needs device tensors), so that one tensor at
    a time is on the device, never the whole state dict."""
    meta = [None if items is None else [(n, t.shape, t.dtype) for n, t in items]]
    dist.broadcast_object_list(meta, src=0)
    for i, (name, shape, dtype) in enumerate(meta[0]):
        tensor = (
            items[i][1].to(device)
            if items is not None
            else torch.empty(shape, dtype=dtype, device=device)
        )
        dist.broadcast(tensor, src=0)
        yield name, tensor


def _reply_error(conn: multiprocessing.connection.Connection, exc: BaseException) -> None:
    trace = traceback.format_exc()
    try:
        conn.send(("error", exc, trace))
    except Exception:  # noqa: BLE001 - an unpicklable exception, or the front end is gone
        try:
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), trace))
        except OSError:
            pass
