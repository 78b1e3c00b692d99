"""Data-parallel serving: N engine ranks as processes behind one front end
(``LLM(..., data_parallel_size=N)``).

Mode ``"replicas"``: every rank is a spawned process running its own ``LLMEngine`` (its own
KV cache and prefix cache; with ``capture_routing`` its own capture buffer and shared-memory
segment ``rollout.capture.shm.segment_name(instance_id, rank)``), joined in a
``torch.distributed`` group (gloo on CPU, NCCL on CUDA, one GPU per rank). Each rank routes its
own tokens (the local case of DESIGN.md "Data parallelism and capture"), so a request's rows
are exactly those a single-rank engine computes for it.

Mode ``"dp_attention"`` (the naive-dispatch case of DESIGN.md): each rank still runs its own
scheduler, KV cache and attention on its own requests, but its MoE layers all-gather the tokens
of all ranks, route them, compute this rank's 1/N slice of the experts and reduce-scatter the
sum (``rollout.engine.expert_parallel``); shared experts and everything outside the MoE blocks
stay on the rank's own tokens. A rank holds the weights of its slice of the experts only
(loaded, allocated and updated), so the experts' memory is split across the ranks. Each rank's
capture buffer takes its own tokens' rows of the routed batch (the capturer's DP rule), so a
request's rows are again those a single-rank engine computes for it. Every forward is
collective, so the ranks step in lockstep: before each step they all-reduce "has work" (with
"stop" and "failed"), and while any rank has work every rank forwards (one without work a
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

A rank replies ``("ok", value)`` or ``("error", exception, traceback text)``
(``rollout.engine.data_parallel_rank``); the front end collects every rank's reply before
raising the first error (by rank), so ranks stay in step. Failures:

- A rank's error in a step: the rank drops its requests (``LLMEngine.abort_all``) and replies
  with it; the others finish theirs (replicas) or stop with it (dp_attention, at the next
  lockstep round). ``generate`` raises it and the next call works. Non-finite logits raise
  ``NonFiniteLogitsError`` naming the prompt. With dp_attention an error inside a forward that
  not every rank hit leaves the others in a collective of it: when they have not replied
  ``_PEER_TIMEOUT_S`` after the first error, every rank is shut down.
- A ``KeyboardInterrupt`` in the front end: "stop" to the ranks, which stop their runs between
  steps; the front end takes the replies it is owed, "abort_all" drops every request, and the
  interrupt propagates, the engine usable. A rank that does not come back within
  ``_STOP_TIMEOUT_S`` (or a second interrupt) shuts every rank down.
- A rank that dies (a signal, ``os._exit``): RuntimeError naming the rank and its exit code or
  signal, every rank shut down; later calls raise RuntimeError saying so.

``shutdown`` (also on a failed start, a rank's death, on garbage collection and at exit) stops
every rank: it shuts its engine down (unlinking its segment) and leaves the group; a rank that
does not stop in time is terminated (its SIGTERM handler still runs that cleanup), then killed
(blocked in a collective, it cannot run a handler), and its segment name unlinked by the front
end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import torch
from tqdm.auto import tqdm

from rollout.capture import shm
from rollout.capture import ReaderSpec
from rollout.config import EngineConfig
from rollout.engine.data_parallel_rank import BadRequest, RankInfo, rank_main
from rollout.engine.llm_engine import NonFiniteLogitsError, check_device
from rollout.engine.expert_parallel import check_expert_split
from rollout.loader import load_tokenizer
from rollout.outputs import EngineStats, RequestOutput
from rollout.sampling_params import SamplingParams

__all__ = ["DataParallelEngine"]

logger = logging.getLogger(__name__)

# Seconds a rank gets to shut its engine down (or to stop a run) before it is terminated.
_STOP_TIMEOUT_S = 30.0
# Seconds the other dp_attention ranks get to reply once one failed in a run; a rank still
# stepping reaches the next lockstep round within a step.
_PEER_TIMEOUT_S = 60.0

Reply = tuple[Any, ...]


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
        ValueError: ``data_parallel_size`` < 2 (or beyond the CUDA devices on CUDA),
            ``device`` naming one CUDA device or CUDA where there is none, or with
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
            check_expert_split(config)
        check_device(config.device, ranks=size)
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
        # Replies each rank owes (commands sent, not yet answered); why the ranks were shut down.
        self._owed: list[int] = []
        self._shut_down_because: str | None = None
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
                    target=rank_main,
                    args=(rank, config, self.instance_id, init_method, child),
                    name=f"rollout-dp{rank}",
                    daemon=True,
                )
                process.start()
                child.close()
                self._processes.append(process)
                self._conns.append(parent)
                self._owed.append(1)  # its RankInfo
            infos: list[RankInfo] = self._gather(range(size))
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
            NonFiniteLogitsError (a ValueError): ``prompts[i]: ...``: the final logits that
                request ``i`` sampled from held a NaN or an inf.
            Any rank's exception during the run, once every rank replied (the module
            docstring); the ranks have dropped this call's requests and the next call works.
            KeyboardInterrupt: the ranks stopped between steps and dropped the requests.
            RuntimeError: a rank died (every rank is shut down), or the ranks were shut down.
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
        with self._interruptible():
            added = self._add(prompt_token_ids, params, assigned)
            # dp_attention: every rank steps, in lockstep, until none has work.
            runners = list(range(size)) if self.config.dp_attention else list(added)
            for r in runners:
                self._send(r, ("run",))
            with tqdm(total=len(params), desc="generate", unit="req", disable=not use_tqdm) as bar:
                try:
                    finished = self._gather_run(runners, lambda r: bar.update(len(assigned[r])))
                except NonFiniteLogitsError as exc:
                    index = assigned[exc.dp_rank][added[exc.dp_rank].index(exc.request_id)]
                    raise NonFiniteLogitsError(
                        f"prompts[{index}]: {exc}", exc.request_id, exc.dp_rank
                    ) from exc
        outputs: list[RequestOutput | None] = [None] * len(params)
        first_id = self._next_request_id
        self._next_request_id += len(params)
        for r, rank_outputs in zip(runners, finished, strict=True):
            for i, out in zip(assigned[r], rank_outputs, strict=True):
                outputs[i] = dataclasses.replace(out, request_id=first_id + i)
        return outputs  # type: ignore[return-value]

    def _add(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        assigned: list[list[int]],
    ) -> dict[int, list[int]]:
        """Queue the requests ``assigned`` to each rank; their ids there, by rank (those with
        requests). A request a rank refuses raises ValueError naming its prompt; the other
        ranks' requests are dropped first."""
        busy = [r for r in range(self.data_parallel_size) if assigned[r]]
        for r in busy:
            self._send(r, ("add", [(list(prompt_token_ids[i]), params[i]) for i in assigned[r]]))
        added = dict(zip(busy, self._gather(busy), strict=True))
        refused = {r: reply for r, reply in added.items() if isinstance(reply, BadRequest)}
        if refused:
            kept = [r for r in busy if r not in refused]
            for r in kept:
                self._send(r, ("abort", added[r]))
            self._gather(kept)
            rank, bad = min(refused.items(), key=lambda kv: assigned[kv[0]][kv[1].position])
            index = assigned[rank][bad.position]
            raise ValueError(f"prompts[{index}]: {bad.error}") from bad.error
        return added

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
        with self._interruptible():
            self._send(0, ("update_weights", items))
            for r in range(1, self.data_parallel_size):
                self._send(r, ("update_weights", None))
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
        self._shut_down(None)

    # ------------------------------------------------------------------ the pipes

    def _command(self, ranks: Iterable[int], message: Reply) -> list[Any]:
        ranks = list(ranks)
        with self._interruptible():
            for r in ranks:
                self._send(r, message)
            return self._gather(ranks)

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Leave the ranks ready for the next call when a KeyboardInterrupt ends this one."""
        try:
            yield
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def _send(self, rank: int, message: Reply) -> None:
        """Send a command that ``rank`` answers with one reply."""
        if self._shut_down_because is not None:
            raise RuntimeError(
                f"data parallel engine: expected live ranks, got ranks shut down "
                f"({self._shut_down_because}): build a new LLM"
            )
        try:
            self._conns[rank].send(message)
        except OSError:
            self._rank_died(rank)
        self._owed[rank] += 1

    def _receive(self, rank: int) -> Reply:
        """The next reply of ``rank``, whose pipe or process is ready."""
        conn = self._conns[rank]
        try:
            if not conn.poll():
                raise EOFError  # woken by the process's end, no reply on the way
            reply = conn.recv()
        except (EOFError, OSError):
            self._rank_died(rank)
        self._owed[rank] -= 1
        return reply

    def _gather_run(self, ranks: list[int], on_reply: Callable[[int], None]) -> list[Any]:
        """The replies to "run". With dp_attention, once a rank failed the others get
        ``_PEER_TIMEOUT_S`` to reply (they stop at the next lockstep round); a rank that does
        not waits in a collective of the failed step: every rank is shut down."""
        if not self.config.dp_attention:
            return self._gather(ranks, on_reply=on_reply)
        return self._gather(ranks, on_reply=on_reply, peer_timeout=_PEER_TIMEOUT_S)

    def _gather(
        self,
        ranks: Iterable[int],
        *,
        on_reply: Callable[[int], None] | None = None,
        peer_timeout: float | None = None,
    ) -> list[Any]:
        """One reply from each of ``ranks`` (as they come); the first rank error (by rank) is
        raised once all replied. ``peer_timeout``: the seconds the others get once one replied
        with an error; then every rank is shut down and that error raised."""
        ranks = list(ranks)
        replies: dict[int, Reply] = {}
        deadline: float | None = None
        while len(replies) < len(ranks):
            waiting = {}
            for r in ranks:
                if r not in replies:
                    waiting[self._conns[r]] = waiting[self._processes[r].sentinel] = r
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(waiting), timeout)
            if not ready:
                failed = min(r for r, reply in replies.items() if reply[0] == "error")
                late = sorted(set(ranks) - set(replies))
                self._shut_down(
                    f"data parallel ranks {late} did not reply within {peer_timeout:.0f} s of "
                    f"rank {failed}'s error (waiting in a collective of its failed step)"
                )
                _raise_if_error(failed, replies[failed])
            for obj in ready:
                r = waiting[obj]
                if r in replies:
                    continue
                replies[r] = self._receive(r)
                if replies[r][0] == "error":
                    if peer_timeout is not None and deadline is None:
                        deadline = time.monotonic() + peer_timeout
                elif on_reply is not None:
                    on_reply(r)
        for r in ranks:
            _raise_if_error(r, replies[r])
        return [replies[r][1] for r in ranks]

    def _interrupt(self) -> None:
        """After a KeyboardInterrupt in the front end: stop the ranks' runs, take every reply
        owed and drop every request ("abort_all"), so that the next call works. A rank that does
        not reply within ``_STOP_TIMEOUT_S``, or another failure meanwhile, shuts every rank
        down."""
        if self._shut_down_because is not None:
            return
        try:
            owing = [r for r in range(self.data_parallel_size) if self._owed[r]]
            for r in owing:
                self._conns[r].send(("stop",))  # answered by the reply to "run" it stops
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            while owing:
                waiting = {self._conns[r]: r for r in owing}
                waiting.update({self._processes[r].sentinel: r for r in owing})
                ready = multiprocessing.connection.wait(
                    list(waiting), max(0.0, deadline - time.monotonic())
                )
                if not ready:
                    raise TimeoutError(f"data parallel ranks {owing} did not stop in time")
                for r in {waiting[obj] for obj in ready}:
                    self._receive(r)  # a result or an error of the interrupted call: dropped
                owing = [r for r in owing if self._owed[r]]
            self._command(range(self.data_parallel_size), ("abort_all",))
        except BaseException as exc:  # noqa: BLE001 - a second interrupt included: shut down
            logger.error("stopping the data parallel ranks after an interrupt failed: %r", exc)
            self._shut_down(f"stopping them after an interrupt failed: {exc!r}")

    def _rank_died(self, rank: int) -> NoReturn:
        """Shut every rank down and raise RuntimeError saying how ``rank`` ended."""
        process = self._processes[rank]
        process.join(_STOP_TIMEOUT_S)  # its exit code: the pipe can close a moment before
        how = _exit_description(process.exitcode)
        message = f"data parallel rank {rank} (pid {process.pid}) died: {how}"
        logger.error("%s: stopping every rank", message)
        self._shut_down(message)
        raise RuntimeError(f"{message}; every rank was shut down")

    def _shut_down(self, reason: str | None) -> None:
        """``shutdown``, keeping the first reason for later calls' errors."""
        if self._shut_down_because is None:
            self._shut_down_because = reason or "shutdown() was called"
        self._finalizer()


def _exit_description(exitcode: int | None) -> str:
    """How a process ended, from ``Process.exitcode``."""
    if exitcode is None:
        return "its pipe closed while the process still runs"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by signal {-exitcode} ({name}), exit code {exitcode}"
    return f"exit code {exitcode}"


def _raise_if_error(rank: int, reply: Reply) -> None:
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
        if process.is_alive():
            # Blocked in a collective a dead peer never joins: its handler cannot run.
            logger.warning("data parallel rank %d ignored SIGTERM: killing it", rank)
            process.kill()
            process.join()
        if process.exitcode != 0:
            # A rank that died without its cleanup leaves its segment behind.
            shm.unlink_if_present(segment_names[rank])
    for conn in conns:
        conn.close()
    shutil.rmtree(rendezvous_dir, ignore_errors=True)
