"""The engine's control plane: sequences, the KV-block pool and the scheduler (plain Python).

The step loop that uses them is ``schedule -> prepare inputs -> run -> sample ->
postprocess``: ``Scheduler.schedule`` returns a ``ScheduledBatch`` with the runner's flat
inputs, and ``Scheduler.postprocess`` takes the sampled tokens back.
"""

from rollout.engine.block_manager import BlockManager
from rollout.engine.scheduler import ScheduledBatch, ScheduledEntry, Scheduler
from rollout.engine.sequence import FinishReason, Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "FinishReason",
    "ScheduledBatch",
    "ScheduledEntry",
    "Scheduler",
    "Sequence",
    "SequenceStatus",
]
