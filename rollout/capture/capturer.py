"""Device capture of routed experts: the buffer the MoE layers write, and the DP row rule
(holder 1 of the story in ``rollout.capture``).

Legend: T tokens of the step (rows), L MoE layers, K top_k; ``buffer_TLK`` is
[max_num_tokens, L, K].

Two ways in, the same rows: ``layer_view(l, T)`` is the ``capture_out`` of
``routing_kernels.route`` (the ids land in ``buffer[:T, l]`` inside the routing kernel: no extra
launch), and ``capture(l, topk_ids, dp)`` copies ids a caller already holds, keeping this
rank's rows of a routed batch by DESIGN.md's data-parallel rule (``rank_rows``, its one home).
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from routing_kernels.expert_ids import ID_DTYPE_CAPACITY, compact_id_dtype

__all__ = ["DPMetadata", "RoutedExpertsCapturer", "compact_id_dtype"]


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class DPMetadata:
    """Token counts of every DP rank in this step, in rank order (``[n_0, n_1, ...]``).

    A list is accepted and stored as a tuple. When the MoE layers all-gather the tokens of all
    ranks before routing (naive dispatch), rank ``r``'s tokens are rows
    ``[cumsum[r] - n_r, cumsum[r])`` of the routed batch.

    Raises:
        TypeError: not a list/tuple of ints.
        ValueError: empty, or a negative count.
    """

    num_tokens_across_dp: tuple[int, ...]

    def __post_init__(self) -> None:
        counts = self.num_tokens_across_dp
        if not isinstance(counts, (list, tuple)):
            raise TypeError(
                f"num_tokens_across_dp: expected a tuple of ints, got {type(counts).__name__}"
            )
        if not counts:
            raise ValueError("num_tokens_across_dp: expected at least one rank, got ()")
        for rank, count in enumerate(counts):
            _check_int(f"num_tokens_across_dp[{rank}]", count, minimum=0)
        object.__setattr__(self, "num_tokens_across_dp", tuple(int(c) for c in counts))


class RoutedExpertsCapturer:
    """The device buffer ``[max_num_tokens, num_moe_layers, top_k]`` of one DP rank's step.

    Row ``t`` of layer ``l`` holds the expert ids of the step's token ``t`` at MoE layer ``l``
    (layer = index among MoE layers, model order). The buffer is allocated once (zeros) and
    never reallocated, so CUDA graphs may capture views of it. Rows past the step's T are stale:
    consumers read ``buffer[:T]`` only.

    Args:
        max_num_tokens: most tokens in one step (the engine's max_num_batched_tokens), >= 1.
        num_moe_layers: MoE layers of the model, >= 1.
        top_k: experts per token, >= 1.
        device: where the buffer lives (the model's device).
        dp_rank: this engine's data-parallel rank, >= 0 (selects its rows under ``DPMetadata``).
        dtype: ``torch.uint8``, ``torch.int16`` or ``torch.int32``; ``None`` means int16. Use
            ``compact_id_dtype(num_experts)`` for DESIGN.md's compact dtype. Ids are cast to
            it unchecked on the device (a check would need a host sync): ``routing_kernels.route``
            refuses a dtype too narrow for its E; ``capture`` trusts its caller.

    Raises:
        TypeError: a count not an int, ``dtype`` not a torch.dtype.
        ValueError: a count out of range, or another dtype.
    """

    def __init__(
        self,
        max_num_tokens: int,
        num_moe_layers: int,
        top_k: int,
        *,
        device: torch.device | str,
        dp_rank: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_num_tokens = _check_int("max_num_tokens", max_num_tokens, minimum=1)
        num_moe_layers = _check_int("num_moe_layers", num_moe_layers, minimum=1)
        top_k = _check_int("top_k", top_k, minimum=1)
        dp_rank = _check_int("dp_rank", dp_rank, minimum=0)
        if dtype is None:
            dtype = torch.int16
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype or None, got {type(dtype).__name__}")
        if dtype not in ID_DTYPE_CAPACITY:
            raise ValueError(
                f"dtype: expected torch.uint8, torch.int16 or torch.int32, got {dtype}"
            )
        self.max_num_tokens = max_num_tokens
        self.num_moe_layers = num_moe_layers
        self.top_k = top_k
        self.dp_rank = dp_rank
        self.buffer = torch.zeros(
            (max_num_tokens, num_moe_layers, top_k), dtype=dtype, device=torch.device(device)
        )

    @property
    def dtype(self) -> torch.dtype:
        """The id dtype of ``buffer``."""
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        """The device of ``buffer``."""
        return self.buffer.device

    def layer_view(self, layer: int, num_tokens: int) -> torch.Tensor:
        """``buffer[:num_tokens, layer]``: the [num_tokens, K] view (row stride L * K) to pass
        as ``routing_kernels.route(..., capture_out=...)`` when routing ``num_tokens`` rows.

        Raises:
            ValueError: ``layer`` not in [0, L) or ``num_tokens`` not in [0, max_num_tokens].
        """
        self._check_layer(layer)
        num_tokens = _check_int("num_tokens", num_tokens, minimum=0)
        if num_tokens > self.max_num_tokens:
            raise ValueError(
                f"num_tokens: expected <= max_num_tokens = {self.max_num_tokens}, got {num_tokens}"
            )
        return self.buffer[:num_tokens, layer]

    def rank_rows(self, num_rows: int, dp: DPMetadata | None = None) -> tuple[int, int]:
        """The rows ``[start, stop)`` of a routed batch of ``num_rows`` that are this rank's.

        No metadata: all rows. With ``dp`` (counts ``n``, this rank ``r``): a batch of
        ``sum(n)`` rows (tokens all-gathered before routing) -> ``[cumsum[r] - n_r,
        cumsum[r])``; a batch of ``n_r`` rows (each rank routes its own tokens) -> all rows.

        Raises:
            ValueError: ``num_rows`` is neither (message: "unexpected topk_ids batch dim" and the
                counts), or ``dp_rank`` has no entry in ``dp``.
        """
        num_rows = _check_int("num_rows", num_rows, minimum=0)
        if dp is None:
            return 0, num_rows
        if not isinstance(dp, DPMetadata):
            raise TypeError(f"dp: expected a DPMetadata or None, got {type(dp).__name__}")
        counts = dp.num_tokens_across_dp
        if self.dp_rank >= len(counts):
            raise ValueError(
                f"dp: expected an entry for dp_rank {self.dp_rank}, got num_tokens_across_dp="
                f"{list(counts)} ({len(counts)} ranks)"
            )
        total = sum(counts)
        mine = counts[self.dp_rank]
        if num_rows == total:
            stop = sum(counts[: self.dp_rank + 1])
            return stop - mine, stop
        if num_rows == mine:
            return 0, num_rows
        raise ValueError(
            f"topk_ids: unexpected topk_ids batch dim {num_rows}: expected "
            f"sum(num_tokens_across_dp) = {total} (all ranks' tokens) or "
            f"num_tokens_across_dp[{self.dp_rank}] = {mine} (this rank's), "
            f"num_tokens_across_dp={list(counts)}"
        )

    def capture(self, layer: int, topk_ids: torch.Tensor, dp: DPMetadata | None = None) -> int:
        """Write this rank's rows of ``topk_ids`` [n, K] into ``buffer[:m, layer]``; return m.

        The rows are chosen by ``rank_rows(n, dp)``; everything is checked before anything is
        written. The ids are cast to the buffer dtype on the device (no host sync).

        Raises:
            TypeError: ``topk_ids`` not a tensor.
            ValueError: ``layer`` out of range; ``topk_ids`` not a 2-D integer [n, top_k] tensor
                on the buffer's device; the DP rule rejects n ("unexpected topk_ids batch dim");
                more rows than ``max_num_tokens``.
        """
        self._check_layer(layer)
        if not isinstance(topk_ids, torch.Tensor):
            raise TypeError(f"topk_ids: expected a torch.Tensor, got {type(topk_ids).__name__}")
        if topk_ids.dim() != 2 or topk_ids.shape[1] != self.top_k:
            raise ValueError(
                f"topk_ids: expected shape [n, {self.top_k}] (top_k), got {tuple(topk_ids.shape)}"
            )
        ids_dtype = topk_ids.dtype
        if ids_dtype.is_floating_point or ids_dtype.is_complex or ids_dtype == torch.bool:
            raise ValueError(f"topk_ids: expected an integer dtype, got {topk_ids.dtype}")
        if topk_ids.device != self.buffer.device:
            raise ValueError(
                f"topk_ids: expected device {self.buffer.device} (the buffer's), "
                f"got {topk_ids.device}"
            )
        start, stop = self.rank_rows(topk_ids.shape[0], dp)
        rows = stop - start
        if rows > self.max_num_tokens:
            raise ValueError(
                f"topk_ids: expected at most max_num_tokens = {self.max_num_tokens} rows for this "
                f"rank, got {rows}"
            )
        self.buffer[:rows, layer].copy_(topk_ids[start:stop])
        return rows

    def _check_layer(self, layer: int) -> None:
        _check_int("layer", layer, minimum=0)
        if layer >= self.num_moe_layers:
            raise ValueError(
                f"layer: expected an MoE layer index in [0, {self.num_moe_layers}), got {layer}"
            )


def _check_int(field: str, value: object, *, minimum: int) -> int:
    """``value`` as an int (numpy integers accepted) after checking it is one, >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{field}: expected >= {minimum}, got {value}")
    return int(value)
