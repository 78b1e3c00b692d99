"""Training/inference mismatch metrics: k3 KL, extreme-token fraction, router agreement.

The logprob metrics compare, token by token, the log-probability of each *sampled* token under
the rollout engine (``logp_rollout``) and under the trainer (``logp_train``), restricted to a
mask (typically the response tokens). With ``r = p_train / p_rollout`` they are the quantities
the R3 paper reports: the k3 estimator of KL(rollout || train), the mean of
``r - 1 - log r``, and the fraction of tokens with ``max(r, 1/r) > tau``. The router metric
compares two routing traces of the same tokens, e.g. the rollout's and the trainer's own.

Legend: R = rows (tokens fed forward), L = MoE layers, K = top_k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from replay.routed_experts import RoutedExperts

if TYPE_CHECKING:
    from matplotlib.axes import Axes


# ---------------------------------------------------------------------- logprob metrics


def kl_k3(
    logp_rollout: torch.Tensor,
    logp_train: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> float:
    """Mean over masked tokens of ``r - 1 - log r``, ``r = exp(logp_train - logp_rollout)``.

    The k3 estimator of KL(rollout || train) on tokens sampled by the rollout; zero iff the two
    logprobs agree on every masked token. Reduced in float64.

    Args:
        logp_rollout: float tensor of the sampled tokens' logprobs under the rollout engine.
        logp_train: float tensor of the same shape, under the trainer.
        mask: optional bool (or 0/1) tensor of the same shape selecting the tokens to count;
            None counts all. At least one token must be selected.
    """
    log_ratio = _masked_log_ratio(logp_rollout, logp_train, mask)
    return (torch.expm1(log_ratio) - log_ratio).mean().item()


def extreme_token_fraction(
    logp_rollout: torch.Tensor,
    logp_train: torch.Tensor,
    mask: torch.Tensor | None = None,
    tau: float = 2.0,
) -> float:
    """Fraction of masked tokens with ``max(r, 1/r) > tau``, ``r = exp(logp_train - logp_rollout)``.

    Arguments as for ``kl_k3``; ``tau`` must be > 1.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau: expected a float, got {type(tau).__name__} {tau!r}")
    if not tau > 1:
        raise ValueError(f"tau: expected > 1, got {tau}")
    log_ratio = _masked_log_ratio(logp_rollout, logp_train, mask)
    # max(r, 1/r) > tau  <=>  |log r| > log tau, without overflowing exp for large gaps.
    return (log_ratio.abs() > math.log(tau)).double().mean().item()


def _masked_log_ratio(
    logp_rollout: torch.Tensor,
    logp_train: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validated ``log r = logp_train - logp_rollout`` at the masked tokens, 1-D float64."""
    for name, value in (("logp_rollout", logp_rollout), ("logp_train", logp_train)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating dtype, got {value.dtype}")
    if logp_train.shape != logp_rollout.shape:
        raise ValueError(
            f"logp_train: expected shape {tuple(logp_rollout.shape)} (as logp_rollout), "
            f"got {tuple(logp_train.shape)}"
        )
    if logp_train.device != logp_rollout.device:
        raise ValueError(
            f"logp_train: expected device {logp_rollout.device} (as logp_rollout), "
            f"got {logp_train.device}"
        )
    if mask is None:
        keep = torch.ones_like(logp_rollout, dtype=torch.bool)
    else:
        keep = _check_mask(mask, logp_rollout)
    if not bool(keep.any()):
        raise ValueError(f"mask: expected at least one selected token, got none of {keep.numel()}")
    selected = {
        "logp_rollout": logp_rollout[keep].double(),
        "logp_train": logp_train[keep].double(),
    }
    for name, values in selected.items():
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            raise ValueError(
                f"{name}: expected finite values at masked tokens, got "
                f"{int((~finite).sum())} non-finite of {values.numel()}"
            )
    return selected["logp_train"] - selected["logp_rollout"]


def _check_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(
            f"mask: expected shape {tuple(like.shape)} (as the logprobs), got {tuple(mask.shape)}"
        )
    if mask.device != like.device:
        raise ValueError(
            f"mask: expected device {like.device} (as the logprobs), got {mask.device}"
        )
    if mask.dtype == torch.bool:
        return mask
    other = (mask != 0) & (mask != 1)
    if bool(other.any()):
        raise ValueError(
            f"mask: expected bool or 0/1 values, got dtype {mask.dtype} with values "
            f"{mask[other].unique()[:5].tolist()}"
        )
    return mask != 0


# ---------------------------------------------------------------------- router agreement


@dataclass(kw_only=True, slots=True, frozen=True)
class RouterAgreement:
    """Fraction of (token, layer) rows whose chosen id sets are equal in two traces.

    Attributes:
        overall: over all compared rows and MoE layers.
        per_layer: one fraction per MoE layer, in ``moe_layers`` order.
        moe_layers: global decoder-layer indices of the MoE layers.
        rows: tokens compared (rows valid in both traces, summed over sequences).
    """

    overall: float
    per_layer: tuple[float, ...]
    moe_layers: tuple[int, ...]
    rows: int

    def __post_init__(self) -> None:
        if len(self.per_layer) != len(self.moe_layers):
            raise ValueError(
                f"per_layer: expected {len(self.moe_layers)} values (one per MoE layer), "
                f"got {len(self.per_layer)}"
            )
        if self.rows < 1:
            raise ValueError(f"rows: expected >= 1, got {self.rows}")
        named = [("overall", self.overall)]
        named += [(f"per_layer[{i}]", value) for i, value in enumerate(self.per_layer)]
        for name, value in named:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1], got {value}")


TraceOrTraces = RoutedExperts | Sequence[RoutedExperts]


def router_agreement(trace_a: TraceOrTraces, trace_b: TraceOrTraces) -> RouterAgreement:
    """Router agreement between two traces of the same tokens, or two equal-length lists of them.

    A (token, layer) row agrees when both traces chose the same *set* of experts (order within
    the row does not matter). Rows where either trace has ``valid`` False are left out. Each
    pair must have equal ``moe_layers``, ``num_experts``, ``top_k``, ``start`` and
    ``num_rows``, and all pairs the same ``moe_layers``; at least one row must be compared.
    """
    pairs = _pairs(trace_a, trace_b)
    moe_layers = pairs[0][0].moe_layers
    agree_L = np.zeros(len(moe_layers), dtype=np.int64)
    rows = 0
    for agree_RL, keep_R in (_compare(a, b) for a, b in pairs):
        agree_L += agree_RL[keep_R].sum(axis=0)
        rows += int(keep_R.sum())
    if rows == 0:
        raise ValueError(
            "valid: expected at least one row valid in both traces, got none "
            f"(of {sum(a.num_rows for a, _ in pairs)} rows)"
        )
    return RouterAgreement(
        overall=float(agree_L.sum() / (rows * len(moe_layers))),
        per_layer=tuple(float(count / rows) for count in agree_L),
        moe_layers=moe_layers,
        rows=rows,
    )


def router_agreement_matrix(trace_a: RoutedExperts, trace_b: RoutedExperts) -> np.ma.MaskedArray:
    """Per (token, layer) agreement of two traces: bool ``[rows, num_moe_layers]``, masked where
    either trace marks the row invalid (so ``.mean()`` and the heatmap skip those rows).
    """
    for name, trace in (("trace_a", trace_a), ("trace_b", trace_b)):
        if not isinstance(trace, RoutedExperts):
            raise TypeError(f"{name}: expected RoutedExperts, got {type(trace).__name__}")
    [(a, b)] = _pairs(trace_a, trace_b)
    agree_RL, keep_R = _compare(a, b)
    return np.ma.MaskedArray(agree_RL, mask=np.repeat(~keep_R[:, None], agree_RL.shape[1], axis=1))


def _pairs(
    trace_a: TraceOrTraces, trace_b: TraceOrTraces
) -> list[tuple[RoutedExperts, RoutedExperts]]:
    """Validated pairs of traces: each pair describes the same tokens of the same model."""
    list_a, list_b = _as_list("trace_a", trace_a), _as_list("trace_b", trace_b)
    if len(list_b) != len(list_a):
        raise ValueError(f"trace_b: expected {len(list_a)} traces (as trace_a), got {len(list_b)}")
    for i, (a, b) in enumerate(zip(list_a, list_b, strict=True)):
        for field in ("moe_layers", "num_experts", "top_k", "start", "num_rows"):
            if getattr(a, field) != getattr(b, field):
                raise ValueError(
                    f"trace_b[{i}].{field}: expected {getattr(a, field)} (as trace_a[{i}]), "
                    f"got {getattr(b, field)}"
                )
        if a.moe_layers != list_a[0].moe_layers:
            raise ValueError(
                f"trace_a[{i}].moe_layers: expected {list_a[0].moe_layers} (as trace_a[0]), "
                f"got {a.moe_layers}"
            )
    return list(zip(list_a, list_b, strict=True))


def _as_list(name: str, traces: TraceOrTraces) -> list[RoutedExperts]:
    items = [traces] if isinstance(traces, RoutedExperts) else traces
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(
            f"{name}: expected RoutedExperts or a sequence of them, got {type(traces).__name__}"
        )
    if not items:
        raise ValueError(f"{name}: expected at least one trace, got an empty sequence")
    for i, item in enumerate(items):
        if not isinstance(item, RoutedExperts):
            raise TypeError(f"{name}[{i}]: expected RoutedExperts, got {type(item).__name__}")
    return list(items)


def _compare(a: RoutedExperts, b: RoutedExperts) -> tuple[np.ndarray, np.ndarray]:
    """(agree bool [rows, layers], keep bool [rows]) for one validated pair."""
    # Sorting within each row turns set equality into elementwise equality (ids are distinct).
    agree_RL = (np.sort(a.ids, axis=2) == np.sort(b.ids, axis=2)).all(axis=2)
    keep_R = np.ones(a.num_rows, dtype=bool)
    for trace in (a, b):
        if trace.valid is not None:
            keep_R &= trace.valid
    return agree_RL, keep_R


# ---------------------------------------------------------------------- plotting


def plot_agreement_heatmap(
    data: RouterAgreement | Sequence[RouterAgreement] | npt.ArrayLike,
    *,
    ax: Axes | None = None,
    labels: Sequence[str] | None = None,
    moe_layers: Sequence[int] | None = None,
    title: str | None = None,
) -> Axes:
    """Draw router agreement as a heatmap: one row per step / run / token, one column per MoE layer.

    Args:
        data: a ``RouterAgreement`` (one row), a sequence of them (one row each; their
            ``moe_layers`` must match), or a 2-D array-like ``[rows, num_moe_layers]`` of
            fractions in [0, 1] (a sequence of per-layer arrays, or a masked array such as
            ``router_agreement_matrix``'s; masked and NaN cells are left blank).
        ax: axes to draw into; None creates a new ``matplotlib.figure.Figure`` without pyplot,
            so no global figure state is touched and any backend (Agg included) works.
        labels: one label per row (e.g. the training steps).
        moe_layers: column labels; taken from the ``RouterAgreement`` inputs when given those,
            else column positions are shown.
        title: optional axes title.

    Returns:
        The axes drawn into (``ax.figure`` is the figure).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    values_RL, columns = _heatmap_values(data, moe_layers)
    num_rows, num_cols = values_RL.shape
    if labels is not None and len(labels) != num_rows:
        raise ValueError(f"labels: expected {num_rows} labels (one per row), got {len(labels)}")

    if ax is None:
        figure = Figure(
            figsize=(min(16.0, 3.0 + 0.25 * num_cols), min(12.0, 2.0 + 0.25 * num_rows)),
            layout="constrained",
        )
        ax = figure.add_subplot()
    image = ax.imshow(
        values_RL, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest"
    )
    ax.figure.colorbar(image, ax=ax, label="router agreement")

    def column_label(x: float, _pos: int) -> str:
        col = round(x)
        return str(columns[col]) if abs(x - col) < 1e-6 and 0 <= col < num_cols else ""

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(column_label))
    ax.set_xlabel("MoE layer")
    if labels is not None:
        ax.set_yticks(range(num_rows), labels=list(labels))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if title is not None:
        ax.set_title(title)
    return ax


def _heatmap_values(
    data: RouterAgreement | Sequence[RouterAgreement] | npt.ArrayLike,
    moe_layers: Sequence[int] | None,
) -> tuple[np.ma.MaskedArray, tuple[int, ...]]:
    """The float [rows, layers] values to draw (invalid cells masked) and the column labels."""
    if isinstance(data, RouterAgreement):
        data = [data]
    if isinstance(data, Sequence) and data and all(isinstance(d, RouterAgreement) for d in data):
        first = data[0].moe_layers
        for i, item in enumerate(data):
            if item.moe_layers != first:
                raise ValueError(
                    f"data[{i}].moe_layers: expected {first} (as data[0]), got {item.moe_layers}"
                )
        if moe_layers is not None and tuple(moe_layers) != first:
            raise ValueError(
                f"moe_layers: expected {first} (as the RouterAgreement data) or None, "
                f"got {tuple(moe_layers)}"
            )
        moe_layers = first
        data = [item.per_layer for item in data]
    try:
        values_RL = np.ma.masked_invalid(np.ma.asarray(data, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"data: expected a 2-D array of fractions [rows, layers]: {err}") from err
    if values_RL.ndim != 2 or 0 in values_RL.shape:
        raise ValueError(
            f"data: expected a non-empty 2-D array [rows, num_moe_layers], got shape "
            f"{values_RL.shape}"
        )
    if values_RL.count() and not (0.0 <= values_RL.min() and values_RL.max() <= 1.0):
        raise ValueError(
            f"data: expected fractions in [0, 1], got min {values_RL.min()}, max {values_RL.max()}"
        )
    num_cols = values_RL.shape[1]
    if moe_layers is None:
        return values_RL, tuple(range(num_cols))
    columns = tuple(int(layer) for layer in moe_layers)
    if len(columns) != num_cols:
        raise ValueError(
            f"moe_layers: expected {num_cols} layers (one per column), got {len(columns)}"
        )
    return values_RL, columns
