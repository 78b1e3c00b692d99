"""Routed-expert capture: the device buffer the routing kernel writes, the host store in shared
memory (one per DP rank, rows by KV slot) and its reader.

Per engine step: the MoE layers write ``RoutedExpertsCapturer.buffer[:T]`` inside the routing
kernel; ``RoutingStore.after_forward`` starts the device->host copy, ``RoutingStore.commit``
scatters the rows by KV slot before outputs are built and before the next schedule; a request's
rows are ``RoutingStore.read(slots)`` (or ``RoutedExpertsReader.read`` from another process).
"""

from rollout.capture.capturer import DPMetadata, RoutedExpertsCapturer, compact_id_dtype
from rollout.capture.reader import ReaderSpec, RoutedExpertsReader
from rollout.capture.store import RoutingStore

__all__ = [
    "DPMetadata",
    "ReaderSpec",
    "RoutedExpertsCapturer",
    "RoutedExpertsReader",
    "RoutingStore",
    "compact_id_dtype",
]
