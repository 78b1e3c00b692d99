"""Routed-expert capture: what the engine records of its routers, from kernel to output.

Legend: N tokens of a sequence, s its ``routed_experts_start``, T tokens of a step, S KV slots,
L MoE layers, K top_k. Row and layer conventions: DESIGN.md (a sequence of N tokens has rows
0 .. N-2, MoE layers only, compact id dtype, logical ids).

The engine holds one capture object (``RoutingCapture``): a ``RoutingRecorder`` with
``capture_routing=True``, else ``CaptureOff``, which holds nothing and does nothing (no buffer,
no segment, no kernel; the model sees no capturer, so its layers do no capture work). The runner
reads its ``capturer`` and calls ``after_forward``; the scheduler calls ``on_preempt`` and
``on_finish``; the engine opens, commits and closes it. The rows pass through four holders:

1. **Device buffer** (``RoutedExpertsCapturer``, module ``capturer``), [max_num_tokens, L, K],
   allocated once before the runner (a static input of its CUDA graphs, counted in its memory
   profile). MoE layer ``l`` writes the step's ids into rows ``[:T]`` of layer ``l`` through the
   capturer's API: ``layer_view(l, T)`` is the routing kernel's ``capture_out`` (no extra
   launch), or, where the ids exist already, ``capture(l, topk_ids, dp)``. Under
   ``data_parallel_mode="dp_attention"`` the MoE layers route the tokens of all ranks
   (``rollout.engine.expert_parallel``) and ``capture`` keeps this rank's rows by the DP rule of
   DESIGN.md, which lives in ``RoutedExpertsCapturer.rank_rows`` only.
2. **Pinned staging** (``RoutingStore``, module ``store``): the runner's ``after_forward`` hook,
   right after a step's forward is enqueued, files the previous step's rows (``commit``: by then
   this step is queued behind that one, so the device stays busy) and starts the asynchronous
   copy of ``buffer[:T]`` to pinned host memory on a side stream; the compute stream waits for
   that copy on the device, never the host, before the next step rewrites the buffer.
3. **The store by KV slot** (``RoutingStore``): ``commit`` scatters a step's staged rows into a
   shared-memory array [S, L, K] by KV slot (``-1`` padding slots dropped). Row ``s`` is the
   routing of the token whose K/V live in slot ``s``, so a prefix-cache hit reads the rows of
   the forward that computed the cached block. A step writes only slots of blocks its sequences
   allocated afresh: a cached block is shared, never recomputed (a hit never covers the last
   prompt token), and a reallocated block is written by its new owner's forward before anything
   reads it. One segment per DP rank (``shm``: created under a per-user lock, marked live by its
   owner's flock, orphans of dead owners reclaimed); a ``RoutedExpertsReader`` (module
   ``reader``) attaches to it by name from another process on the node (``ReaderSpec``).
4. **The output** ([N - 1 - s, L, K], ``RequestOutput.routed_experts``): the scheduler's
   ``on_finish`` (before the blocks are freed) reads the rows of positions ``[s, N - 1)``
   from the store straight into the output array (``seq.routed_experts``). A sequence preempted
   first keeps, in ``seq.saved_routing``, the rows of what it had fed (``on_preempt``, before
   its blocks are freed): the rows of the forward that first consumed each token (sampling
   time), never those of its recompute; ``on_finish`` puts them at the head of the output.

Pipelining (``rollout.engine.llm_engine``): one step's copy is pending in the staging buffer
until the next step's ``after_forward`` or a ``commit``. When batch N's tokens finish a
sequence, batch N+1 is in flight and its copy is the pending one; it holds no row the finished
sequence reads (it feeds at most the finished sequence's last token, whose row is not
returned), and all of batch N's rows were filed at N+1's ``after_forward``. So a save commits
(waits for the device) only when the pending batch feeds the sequence a position below the end
it reads, which happens when the next schedule preempts a sequence of the batch in flight.
"""

from rollout.capture.capturer import DPMetadata, RoutedExpertsCapturer, compact_id_dtype
from rollout.capture.reader import ReaderSpec, RoutedExpertsReader
from rollout.capture.recorder import CaptureOff, RoutingCapture, RoutingRecorder
from rollout.capture.store import RoutingStore

__all__ = [
    "CaptureOff",
    "DPMetadata",
    "ReaderSpec",
    "RoutedExpertsCapturer",
    "RoutedExpertsReader",
    "RoutingCapture",
    "RoutingRecorder",
    "RoutingStore",
    "compact_id_dtype",
]
