"""``Learner``: the HF policy, its optimizer and one GRPO update per rollout batch, with the
routing of the training forward chosen by the routing mode (``none``, ``r3``, ``r2``: one
strategy each, ``replay.trainer.routing_modes``).

One ``step(batch, advantages)``, in passes over micro-batches of ``micro_batch_size`` answers:

1. *old pass* (no grad), when the update needs logprobs of the pre-update policy apart from
   its own forward: ``num_minibatches > 1`` (later minibatches run after an optimizer step)
   or ``r2`` (the recording). Routing: recorded (``none``, ``r2``) or replayed (``r3``).
2. *native pass* (no grad, ``r3`` with ``native_router_agreement``): records the policy's
   native routing for the metric only.
3. *reference pass* (no grad, ``kl_coef > 0``): the frozen reference policy, native routing.
4. *update*: per minibatch, forward (routing by mode, ``ExpertsTap`` reading the ids the
   experts receive), GRPO loss, backward per micro-batch; clip; optimizer step. Without an
   old pass, the old logprobs are the update forward's own, detached (ratio 1 at the
   gradient, the on-policy case).

Metrics compare the rollout engine with the trainer *before* the update on the answer tokens:
``kl_k3`` and ``extreme_token_fraction`` (F(2)) of the old logprobs against the rollout's;
``router_agreement``: rollout traces vs the ids the update's experts received;
``router_agreement_native``: rollout traces vs the pre-update policy's native routing.
Routing metrics need the rollout's traces and are absent without them (never filled in).

Several ranks (``trainer.world_size > 1``, FSDP2, ``replay.trainer.distributed``): every rank
gets the whole batch, draws the same shuffle and trains on its equal, contiguous share of
every minibatch (whole answers; the batch must split evenly). Each micro-batch's loss is
normalised by the whole minibatch's token (or sequence) count, as on one rank, and multiplied
by ``world_size`` because FSDP averages the gradients over ranks: the update is the one-rank
update on the whole batch up to float rounding. Each rank replays its own answers' traces;
metrics are computed from every rank's share and are the same on all ranks.

Legend: B answers, S token positions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import replay
import rollout
from replay.expert_tap import ExpertsTap
from replay.layout import BatchLayout
from replay.routed_experts import RoutedExperts
from replay.trainer import distributed
from replay.trainer.batch import Batch, TrainBatch
from replay.trainer.config import GRPOConfig, RoutingMode, TrainerConfig
from replay.trainer.grpo import LossTerms, policy_loss, token_logprobs
from replay.trainer.routing_modes import routing_mode
from replay.trainer.step_stats import Chunk, Minibatch, StepStats, Totals

__all__ = ["Learner"]

logger = logging.getLogger(__name__)

_TRAINER_STATE = "trainer_state.pt"
_POLICY_DIR = "policy"


class Learner:
    """The policy being trained, plain PyTorch (the Ray ``TrainerWorker`` wraps one).

    With ``trainer.world_size > 1`` one ``Learner`` per rank is built inside an initialised
    process group of that size; every method is then a collective that all ranks call.

    Args:
        model_path: HF checkpoint folder of the policy (float32 parameters are trained).
        trainer: optimizer and batching settings; ``trainer.device`` is where it runs.
        grpo: the objective.
        routing: ``none``, ``r3`` or ``r2``.
        seed: seeds torch (minibatch shuffling, anything random in the model).
        reference_path: checkpoint of the frozen reference policy for ``grpo.kl_coef > 0``
            (default: ``model_path``).
        native_router_agreement: run the extra native pass under ``r3`` (see module doc).
        policy_dtype: with ``trainer.policy == "engine"``: the policy's dtype, as
            ``rollout.LLM``'s ``dtype`` (pass the rollout's, for bitwise agreement).
        deterministic: with ``trainer.policy == "engine"``: batch-invariant numerics (the
            rollout's ``deterministic``); the logprobs are then ``token_logprobs(...,
            invariant=True)``, the engine sampler's function.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        trainer: TrainerConfig,
        grpo: GRPOConfig,
        routing: RoutingMode,
        seed: int = 0,
        reference_path: str | Path | None = None,
        native_router_agreement: bool = True,
        policy_dtype: str = "auto",
        deterministic: bool = False,
    ) -> None:
        self.routing = routing_mode(routing)
        self.config = trainer
        self.grpo = grpo
        self.native_router_agreement = native_router_agreement
        self.policy_dtype = policy_dtype
        self.deterministic = deterministic and trainer.policy == "engine"
        self.world_size = trainer.world_size
        self.rank = distributed.check_process_group(trainer.world_size)
        self.device = torch.device(trainer.device)
        self.model_path = Path(model_path)
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.model = self._load(self.model_path)
        self.model.train()
        if trainer.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.ctl = replay.patch(self.model)
        self.reference = None
        if grpo.kl_coef > 0:
            self.reference = self._load(Path(reference_path or model_path)).eval()
            self.reference.requires_grad_(False)
        if self.world_size > 1:
            distributed.shard_policy(self.model)
            if self.reference is not None:
                distributed.shard_policy(self.reference)
        # Built after sharding: on one rank it steps only that rank's shards.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=trainer.lr,
            betas=(trainer.beta1, trainer.beta2),
            eps=trainer.adam_eps,
            weight_decay=trainer.weight_decay,
        )
        self.step_count = 0
        self.pad_token_id = _pad_token_id(self.model.config)

    def _load(self, path: Path) -> torch.nn.Module:
        if self.config.policy == "engine":
            # float32 master weights (as the HF path trains); the deterministic forward rounds
            # them to the rollout's dtype per op, as the engine holding them in it does.
            return rollout.load_policy(
                path,
                dtype=self.policy_dtype,
                device=self.device,
                deterministic=self.deterministic,
                parameter_dtype=torch.float32 if self.deterministic else None,
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.to(self.device)
        if self.config.grouped_experts != "off":
            replay.use_grouped_experts(model, backend=self.config.grouped_experts)
        return model

    # ------------------------------------------------------------------ the update

    def step(self, batch: Batch, advantages: np.ndarray) -> dict[str, Any]:
        """One GRPO update on ``batch`` with one advantage per answer; returns its metrics."""
        advantages = np.asarray(advantages, dtype=np.float32)
        if advantages.shape != (len(batch),):
            raise ValueError(
                f"advantages: expected shape ({len(batch)},) (one per answer), "
                f"got {advantages.shape}"
            )
        if len(batch) < self.config.num_minibatches:
            raise ValueError(
                f"batch: expected at least num_minibatches ({self.config.num_minibatches}) "
                f"answers, got {len(batch)}"
            )
        shares = self.config.num_minibatches * self.world_size
        if self.world_size > 1 and len(batch) % shares:
            raise ValueError(
                f"batch: expected a multiple of num_minibatches x world_size ({shares}) answers "
                f"(every rank trains on an equal share of each minibatch), got {len(batch)}"
            )
        rollout_traces = self._rollout_traces(batch)
        start = time.perf_counter()
        minibatches = [
            Minibatch(
                parts=[
                    Chunk(
                        indices=idx,
                        tensors=batch.select(idx).to_tensors(
                            self.device, pad_token_id=self.pad_token_id
                        ),
                        advantages=torch.from_numpy(advantages[idx]).to(self.device),
                    )
                    for idx in micro_batches
                ],
                # The whole minibatch's counts (all ranks' shares): the loss normalisers.
                num_tokens=float(sum(len(batch.token_ids[i]) for i in indices)),
                num_sequences=float(len(indices)),
            )
            for indices, micro_batches in self._split(len(batch))
        ]
        parts = [part for minibatch in minibatches for part in minibatch.parts]
        for part in parts:
            part.layout = BatchLayout.from_attention_mask(part.tensors.attention_mask_BS)
            if rollout_traces is not None:
                part.rollout_traces = [rollout_traces[i] for i in part.indices]

        with torch.no_grad():
            if self.config.num_minibatches > 1 or self.routing.needs_old_pass:
                for part in parts:
                    forward = functools.partial(self._forward, self.model, part.tensors)
                    self.routing.old_pass(self.ctl, part, forward)
            if self.routing.native_pass and self.native_router_agreement and rollout_traces:
                for part in parts:
                    with self.ctl.record(attention_mask=part.tensors.attention_mask_BS) as rec:
                        self._forward(self.model, part.tensors)
                    part.native_traces = rec.traces
            if self.reference is not None:
                for part in parts:
                    part.logp_ref = self._forward(self.reference, part.tensors)

        totals = Totals()
        for minibatch in minibatches:
            self._update(minibatch, totals)
        self.step_count += 1
        stats = StepStats.collect(parts, totals)
        if self.world_size > 1:
            stats = StepStats.merge(distributed.all_gather_objects(stats.to_cpu()))
        metrics = stats.metrics()
        metrics["time_train_s"] = time.perf_counter() - start
        metrics["train_tokens"] = stats.train_tokens
        return metrics

    def _rollout_traces(self, batch: Batch) -> tuple[RoutedExperts, ...] | None:
        traces = self.routing.rollout_traces(batch)
        if traces is not None and traces and traces[0].moe_layers != self.ctl.moe_layers:
            raise ValueError(
                f"traces[0].moe_layers: expected the policy's MoE layers {self.ctl.moe_layers}, "
                f"got {traces[0].moe_layers}"
            )
        return traces

    def _split(self, size: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Answer indices of a shuffled batch: per minibatch, all its answers and this rank's
        micro-batches (of its share; every rank draws the same shuffle)."""
        order = torch.randperm(size, generator=self.generator).numpy()
        micro = self.config.micro_batch_size
        out = []
        for mb in np.array_split(order, self.config.num_minibatches):
            mine = np.array_split(mb, self.world_size)[self.rank]
            out.append((mb, [mine[i : i + micro] for i in range(0, len(mine), micro)]))
        return out

    def _update(self, minibatch: Minibatch, totals: Totals) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for part in minibatch.parts:
            tap = ExpertsTap(self.ctl) if part.rollout_traces is not None else None
            with self.routing.update_routing(self.ctl, part), tap or contextlib.nullcontext():
                logp_BS = self._forward(self.model, part.tensors)
            if part.logp_old is None:
                part.logp_old = logp_BS.detach()
                if self.routing.update_is_native and tap is not None:
                    part.native_traces = tap.traces(part.layout)
            if tap is not None:
                part.used_traces = tap.traces(part.layout)
            terms = self._loss(part, logp_BS, minibatch.num_tokens, minibatch.num_sequences)
            # FSDP averages gradients over ranks; the minibatch's gradient is their sum.
            (terms.loss * self.world_size).backward()
            units = (
                part.tensors.answer_mask_BS.sum()
                if self.grpo.ratio == "token"
                else len(part.indices)
            )
            totals.add(terms, units=float(units))
        params = [p for p in self.model.parameters() if p.grad is not None]
        # Sharded gradients give a DTensor norm awaiting its reduction over the ranks.
        grad_norm = distributed.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, grad_norm)
        totals.end_minibatch(float(grad_norm))
        self.optimizer.step()

    def _loss(
        self,
        part: Chunk,
        logp_BS: torch.Tensor,
        num_tokens: float,
        num_sequences: float,
    ) -> LossTerms:
        grpo, t = self.grpo, part.tensors
        assert part.logp_old is not None
        return policy_loss(
            logp_BS,
            part.logp_old,
            part.advantages,
            t.answer_mask_BS,
            clip_low=grpo.clip_low,
            clip_high=grpo.clip_high,
            ratio=grpo.ratio,
            loss_agg=grpo.loss_agg,
            logp_rollout_BS=t.rollout_logp_BS if grpo.tis_cap is not None else None,
            tis_cap=grpo.tis_cap,
            logp_ref_BS=part.logp_ref,
            kl_coef=grpo.kl_coef,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )

    def _forward(self, model: torch.nn.Module, tensors: TrainBatch) -> torch.Tensor:
        """Float32 logprobs ``[B, S]`` of ``model`` on ``tensors`` (autocast per config)."""
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.config.compute_dtype == "bfloat16":
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.policy == "engine":
            logits_BSV = model(tensors.input_ids_BS, attention_mask=tensors.attention_mask_BS)
            return token_logprobs(logits_BSV, tensors.input_ids_BS, invariant=self.deterministic)
        with autocast:
            logits_BSV = model(
                input_ids=tensors.input_ids_BS,
                attention_mask=tensors.attention_mask_BS,
                use_cache=False,
            ).logits
        return token_logprobs(logits_BSV, tensors.input_ids_BS)

    # ------------------------------------------------------------------ weights, checkpoints

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The policy's parameters by HF name, detached full copies on the CPU (for weight
        sync). With several ranks: rank 0 gets them, the others an empty dict."""
        weights = {}
        for name, tensor in self._full_parameters():
            if self.rank == 0:
                weights[name] = tensor.to("cpu", copy=True)
        return weights

    def device_weights(self) -> dict[str, torch.Tensor]:
        """The policy's parameters by HF name, detached and whole on the training device: the
        parameters themselves on one rank (no copy: valid until the next ``step``), gathered
        copies on rank 0 with several ranks (the others get an empty dict)."""
        return {name: tensor for name, tensor in self._full_parameters() if self.rank == 0}

    def _full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        # On every rank, in the same order: gathering a shard is a collective.
        for name, param in self.model.named_parameters():
            yield name, distributed.full_tensor(param.detach())

    def save(self, folder: str | Path) -> None:
        """Write ``folder/policy`` (an HF checkpoint with the tokenizer, loadable by the engine)
        and ``folder/trainer_state.pt`` (optimizer, step, RNG states). With several ranks all
        call it and rank 0 writes the gathered state."""
        folder = Path(folder)
        policy = folder / _POLICY_DIR
        optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        if self.world_size > 1:
            model_state = distributed.full_model_state(self.model)
            if self.rank == 0:
                self.model.save_pretrained(policy, state_dict=model_state)
        else:
            self.model.save_pretrained(policy)
        if self.rank != 0:
            return
        for name in ("tokenizer.json", "tokenizer_config.json"):
            source = self.model_path / name
            if source.exists():
                shutil.copyfile(source, policy / name)
        state = {
            "optimizer": optimizer_state,
            "step": self.step_count,
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        torch.save(state, folder / _TRAINER_STATE)

    def load_state(self, folder: str | Path) -> None:
        """Restore optimizer, step and RNG from ``folder/trainer_state.pt`` (the weights come
        from building the learner on ``folder/policy``); any number of ranks, each reading it."""
        state = torch.load(Path(folder) / _TRAINER_STATE, map_location="cpu", weights_only=False)
        distributed.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.step_count = int(state["step"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.generator.set_state(state["generator"].cpu())
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    @staticmethod
    def policy_dir(folder: str | Path) -> Path:
        """Where ``save`` puts the policy checkpoint inside ``folder``."""
        return Path(folder) / _POLICY_DIR


def _pad_token_id(config: Any) -> int:
    """An id for padding (masked out, so any valid id): the pad, else the first eos, else 0."""
    for value in (
        getattr(config, "pad_token_id", None),
        getattr(config, "eos_token_id", None),
    ):
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and value:
            return int(value[0])
    return 0
