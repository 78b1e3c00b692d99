"""Data-parallel serving: N engine ranks as processes behind one front end
(``LLM(..., data_parallel_size=N)``).

Mode ``"replicas"``: every rank is a spawned process running its own ``LLMEngine`` (its own
KV cache and prefix cache; with ``capture_routing`` its own capture buffer and shared-memory
segment ``rollout.shm.segment_name(instance_id, rank)``), joined in a ``torch.distributed``
group (gloo on CPU, NCCL on CUDA, one GPU per rank). Each rank routes its own tokens (the local
case of DESIGN.md "Data parallelism and capture"), so a request's rows are exactly those a
single-rank engine computes for it. Mode ``"dp_attention"`` (MoE layers over the tokens of all
ranks) is not implemented yet.

The front end talks to each rank over a pipe, one command at a time per rank, all ranks in
parallel::

    generate: assign requests (least loaded) -> "add" to every rank -> "run" on every rank
              -> outputs in prompt order (each rank ships a request's rows with its output;
              the rank's output path read them from its own store)
    update_weights: "update_weights" to every rank; rank 0 gets the tensors and broadcasts
              them to the others through the process group

A rank replies ``("ok", value)`` or ``("error", exception, traceback text)``; the front end
collects every rank's reply before raising the first error, so ranks stay in step. A rank that
dies is reported by its exit code. ``shutdown`` (also on a failed start, on an interrupted
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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from rollout import shm
from rollout.capture import ReaderSpec
from rollout.config import EngineConfig
from rollout.engine.llm_engine import LLMEngine
from rollout.loader import load_tokenizer
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


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class _BadRequest:
    """A rank's reply to "add" when its ``position``-th request was refused (none was kept)."""

    position: int
    error: Exception


class DataParallelEngine:
    """The front end of ``config.data_parallel_size`` engine ranks (processes).

    Duck-types the parts of ``LLMEngine`` that ``rollout.LLM`` uses (``tokenizer``,
    ``vocab_size``, ``routing_spec``, ``routing_reader_spec``, ``stats``, ``update_weights``,
    ``shutdown``) and adds ``generate``.

    Args:
        config: the engine settings; ``data_parallel_size`` >= 2.
        instance_id: names the ranks' segments (``segment_name(instance_id, rank)``); None
            draws a fresh one.

    Raises:
        ValueError: ``data_parallel_size`` < 2, or ``device`` naming one CUDA device.
        NotImplementedError: ``data_parallel_mode="dp_attention"``.
        RuntimeError / the rank's exception: a rank failed to start (every rank is stopped).
    """

    def __init__(self, config: EngineConfig, *, instance_id: str | None = None) -> None:
        size = config.data_parallel_size
        if size < 2:
            raise ValueError(
                f"data_parallel_size: expected >= 2 for DataParallelEngine, got {size}"
            )
        if config.data_parallel_mode != "replicas":
            raise NotImplementedError(
                f"data_parallel_mode: {config.data_parallel_mode!r} is not implemented yet "
                "(use 'replicas')"
            )
        if config.device is not None and config.device.startswith("cuda:"):
            raise ValueError(
                "device: expected None, 'cpu' or 'cuda' with data_parallel_size > 1 "
                f"(rank r uses cuda:r), got {config.device!r}"
            )
        self.config = config
        self.instance_id = shm.new_instance_id() if instance_id is None else instance_id
        self.segment_names = tuple(shm.segment_name(self.instance_id, r) for r in range(size))
        self.tokenizer = load_tokenizer(config.model)
        self._next_request_id = 0
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
            aborted its requests). An interruption of the front end (KeyboardInterrupt) stops
            every rank and leaves the engine shut down.
        """
        assert len(prompt_token_ids) == len(params)
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
            for r in busy:
                self._conns[r].send(("run",))
            with tqdm(total=len(params), desc="generate", unit="req", disable=not use_tqdm) as bar:
                finished = self._gather(busy, on_reply=lambda r: bar.update(len(assigned[r])))
        except (KeyboardInterrupt, EOFError, OSError):
            self.shutdown()
            raise
        outputs: list[RequestOutput | None] = [None] * len(params)
        first_id = self._next_request_id
        self._next_request_id += len(params)
        for r, rank_outputs in zip(busy, finished, strict=True):
            for i, out in zip(assigned[r], rank_outputs, strict=True):
                outputs[i] = dataclasses.replace(out, request_id=first_id + i)
        return outputs  # type: ignore[return-value]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into every rank's model (rank 0 broadcasts them through the
        process group) and reset every rank's prefix cache.

        Returns the names of the model parameters written completely (rank 0's; every rank
        gets the same tensors).

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
        return self._gather(range(self.data_parallel_size))[0]

    def shutdown(self) -> None:
        """Stop every rank: engines shut down, segments unlinked, group left (idempotent)."""
        self._finalizer()

    # ------------------------------------------------------------------ the pipes

    def _command(self, ranks: Iterable[int], message: tuple[Any, ...]) -> list[Any]:
        ranks = list(ranks)
        for r in ranks:
            self._conns[r].send(message)
        return self._gather(ranks)

    def _gather(self, ranks: Iterable[int], on_reply=None) -> list[Any]:
        """One reply from each of ``ranks`` (as they come); the first rank error is raised once
        all replied."""
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
                if on_reply is not None:
                    on_reply(r)
        for r in ranks:
            if replies[r][0] == "error":
                _, error, trace = replies[r]
                raise error from RuntimeError(f"data parallel rank {r}:\n{trace}")
        return [replies[r][1] for r in ranks]


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
        "run": lambda: _run(engine),
        "stats": lambda: engine.stats,
        "update_weights": lambda items: engine.update_weights(_broadcast(items, device)),
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


def _run(engine: LLMEngine) -> list[RequestOutput]:
    """Step until every queued request finished; outputs in the order they were added."""
    outputs: dict[int, RequestOutput] = {}
    try:
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] = out
    except BaseException:
        for seq in [*engine.scheduler.waiting, *engine.scheduler.running]:
            engine.abort_request(seq.seq_id)
        raise
    return [outputs[i] for i in sorted(outputs)]


def _broadcast(
    items: list[tuple[str, torch.Tensor]] | None, device: torch.device
) -> list[tuple[str, torch.Tensor]]:
    """Rank 0's ``items`` on every rank: names, shapes and dtypes as one object, then each
    tensor (on ``device``: NCCL needs device tensors)."""
    meta = [None if items is None else [(n, t.shape, t.dtype) for n, t in items]]
    dist.broadcast_object_list(meta, src=0)
    received = []
    for i, (name, shape, dtype) in enumerate(meta[0]):
        tensor = (
            items[i][1].to(device)
            if items is not None
            else torch.empty(shape, dtype=dtype, device=device)
        )
        dist.broadcast(tensor, src=0)
        received.append((name, tensor))
    return received


def _reply_error(conn: multiprocessing.connection.Connection, exc: BaseException) -> None:
    trace = traceback.format_exc()
    try:
        conn.send(("error", exc, trace))
    except Exception:  # noqa: BLE001 - an unpicklable exception, or the front end is gone
        try:
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), trace))
        except OSError:
            pass
