"""The engine's control plane: sequences, the KV-block pool and the scheduler (plain Python).

The step loop that uses them is ``schedule -> prepare inputs -> run -> sample -> advance``
for batch N+1, then ``postprocess`` of batch N once its tokens arrive (``LLMEngine``
pipelines one batch ahead): ``Scheduler.schedule`` returns a ``ScheduledBatch`` with the
runner's flat inputs, ``Scheduler.advance`` books its tokens as placeholders, and
``Scheduler.postprocess`` fills in the sampled tokens and applies the stop rules.
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
