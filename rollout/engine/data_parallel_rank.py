"""One data-parallel rank's process: its engine, serving the front end's commands over a pipe
(``rollout.engine.data_parallel`` is the front end and tells the whole protocol).

A rank joins the ``torch.distributed`` group, builds its ``LLMEngine`` (``dp_rank`` = its rank),
reports a ``RankInfo`` and then answers one command at a time with ``("ok", value)`` or
``("error", exception, traceback text)``, until "shutdown" (or the pipe's end).

"run" steps the engine until its requests are done and replies with their outputs, or with None
when the run was stopped: between two steps the rank looks at its pipe, and a command waiting
there (the front end's "stop" after a ``KeyboardInterrupt``, or "shutdown") stops the run, drops
its requests (``LLMEngine.abort_all``) and is served next ("stop" itself needs no reply). With
dp_attention every forward is collective, so before each step the ranks all-reduce three flags:
has work, stops, failed. They keep stepping (a rank without work of its own runs idle) while any
has work, and all stop together. A rank whose step raised ``NonFiniteLogitsError`` (found after
the step's collectives, in the sampled tokens) joins the next round with "failed" and then
raises it; its peers drop their requests and reply None. Any other error of a dp_attention step
is raised at once: it may have left the peers inside a collective of that step (unless they
failed at the same point, e.g. on the same weights), which the front end finds out.

Ranks ignore SIGINT: a Ctrl-C in a terminal reaches the whole process group, and a forward cut
at a different point on each rank would leave them out of step; the front end stops them
between steps instead. SIGTERM (``terminate``) unwinds through the cleanup: the engine unlinks
its segment and the rank leaves the group.
"""

from __future__ import annotations

import dataclasses
import multiprocessing.connection
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from rollout.capture import ReaderSpec
from rollout.config import EngineConfig
from rollout.engine.llm_engine import LLMEngine, NonFiniteLogitsError
from rollout.outputs import RequestOutput, RoutingSpec
from rollout.sampling_params import SamplingParams

__all__ = ["BadRequest", "RankInfo", "rank_main"]


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class RankInfo:
    """What a rank reports once its engine is built."""

    routing_spec: RoutingSpec
    vocab_size: int
    reader_spec: ReaderSpec | None
    parameter_names: frozenset[str]


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class BadRequest:
    """A rank's reply to "add" when its ``position``-th request was refused (none was kept)."""

    position: int
    error: Exception


class _Commands:
    """The rank's end of the pipe. A command read while a run steps (``stop_requested``) stops
    that run and is the next one served."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self._pending: tuple[Any, ...] | None = None

    def next(self) -> tuple[Any, ...]:
        """The next command (waits for it)."""
        if self._pending is not None:
            command, self._pending = self._pending, None
            return command
        return self.conn.recv()

    def stop_requested(self) -> bool:
        """Whether a command is waiting (never waits)."""
        if self._pending is None and self.conn.poll():
            self._pending = self.conn.recv()
        return self._pending is not None


def rank_main(
    rank: int,
    config: EngineConfig,
    instance_id: str,
    init_method: str,
    conn: multiprocessing.connection.Connection,
) -> None:
    """A rank's process: join the group, build the engine, serve commands until "shutdown"."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
                RankInfo(
                    routing_spec=engine.routing_spec,
                    vocab_size=engine.vocab_size,
                    reader_spec=engine.routing_reader_spec,
                    parameter_names=engine.parameter_names,
                ),
            )
        )
        _serve(
            engine,
            _Commands(conn),
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


def _serve(engine: LLMEngine, commands: _Commands, device: torch.device) -> None:
    handlers = {
        "add": lambda batch: _add(engine, batch),
        "abort": lambda ids: _abort(engine, ids),
        "abort_all": engine.abort_all,
        "run": lambda: _run(engine, commands, device),
        "stats": lambda: engine.stats,
        "parameter_shapes": lambda: {
            name: tuple(p.shape) for name, p in engine.runner.model.named_parameters()
        },
        "update_weights": lambda items: _update_weights(engine, items, device),
        "sleep": engine.sleep,
        "wake_up": engine.wake_up,
    }
    while True:
        command, *args = commands.next()
        if command == "shutdown":
            return
        if command == "stop":
            continue  # it came after the run it was meant to stop had finished
        try:
            reply = ("ok", handlers[command](*args))
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the front end
            _reply_error(commands.conn, exc)
            continue
        commands.conn.send(reply)


def _add(
    engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]]
) -> list[int] | BadRequest:
    ids: list[int] = []
    for position, (tokens, params) in enumerate(batch):
        try:
            ids.append(engine.add_request(tokens, params))
        except ValueError as exc:
            _abort(engine, ids)
            return BadRequest(position=position, error=exc)
    return ids


def _abort(engine: LLMEngine, request_ids: list[int]) -> None:
    for request_id in request_ids:
        engine.abort_request(request_id)


def _run(
    engine: LLMEngine, commands: _Commands, device: torch.device
) -> list[RequestOutput] | None:
    """Step until every queued request finished; outputs in the order they were added. None
    when the run was stopped (a command arrived, or with dp_attention another rank failed):
    the requests are dropped then (see the module docstring)."""
    outputs: dict[int, RequestOutput] = {}
    failure: NonFiniteLogitsError | None = None
    try:
        while True:
            work, stop, failed = _round(
                engine, device, stop=commands.stop_requested(), failed=failure is not None
            )
            if failure is not None:
                raise failure
            if stop or failed:
                engine.abort_all()
                return None
            if not work:
                return [outputs[i] for i in sorted(outputs)]
            try:
                if engine.has_unfinished():
                    outputs.update((out.request_id, out) for out in engine.step())
                else:
                    engine.runner.run_idle()
            except NonFiniteLogitsError as exc:
                if not engine.config.dp_attention:
                    raise
                failure = exc  # raised once the next round has told the other ranks
    except BaseException:
        engine.abort_all()
        raise


def _round(engine: LLMEngine, device: torch.device, *, stop: bool, failed: bool) -> list[bool]:
    """Whether any rank has work, stops, failed: with dp_attention an all-reduce that every rank
    makes before each step; otherwise this rank's own."""
    flags = [engine.has_unfinished(), stop, failed]
    if not engine.config.dp_attention:
        return flags
    flags_3 = torch.tensor(flags, dtype=torch.int64, device=device)
    dist.all_reduce(flags_3, op=dist.ReduceOp.MAX)
    return [bool(flag) for flag in flags_3.tolist()]


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
