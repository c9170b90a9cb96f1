"""Gradient accumulation that equals the bigger batch: every batch-level statistic over the optimizer step's batch.

transformers' ``Trainer`` collects the micro-batches of one optimizer step before the first forward pass
(``get_batch_samples``) and hands each ``training_step`` the step's ``num_items_in_batch`` (the labelled tokens of
all of them), so a causal-LM loss normalised by it is the bigger batch's (``sft``; the classifier's head counts its
labels the same way). An objective whose loss is a mean over *examples* (pairs, rated rows, sampled completions), or
that needs a statistic of the whole batch (KTO's KL reference point, GRPO's sampled groups), subclasses the
``StepBatchTrainer`` of :func:`step_batch_trainer_class`: ``num_items_in_batch`` becomes the number of examples in
the step (summed over the processes of a distributed run), each micro-batch's loss is its examples' summed loss
divided by it (so the Trainer adds, never averages, the micro-batches), and :class:`StepBatch` holds the step's
micro-batches so that a statistic is computed once over all of them, on first use (after a resumed run has
restored its RNG state: transformers restores it after collecting the first resumed step's micro-batches).

With batch ``b`` and ``gradient_accumulation_steps=k`` the gradient and the logged loss of every step are then
those of batch ``k*b`` on the same rows (up to float rounding of the different matmul shapes), the last, shorter
step of an epoch included. :class:`finetune_sdk.testing.objective_contract.ObjectiveContract` checks it.

Example:
    >>> step = StepBatch([{"x": 1}, {"x": 2}], examples=4)
    >>> step.once("total", lambda: sum(b["x"] for b in step.micro_batches)), step.once("total", lambda: 0)
    (3, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["StepBatch", "step_batch_trainer_class"]


class StepBatch:
    """The collated micro-batches of one optimizer step and the number of examples in the whole step (all
    processes); :meth:`once` computes a statistic of the step once and shares it between the micro-batches."""

    def __init__(self, micro_batches: list[Any], examples: int) -> None:
        self.micro_batches = micro_batches
        self.examples = examples
        #: The index in ``micro_batches`` of the micro-batch being trained on now.
        self.current = 0
        self._values: dict[str, Any] = {}

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for in this step, the same value afterwards."""
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]


def step_batch_trainer_class(base: type) -> type:
    """``StepBatchTrainer``: these methods on a transformers ``Trainer`` class ``base`` (built lazily, so importing
    this module stays light). Subclasses define ``examples_in(batch) -> int`` and divide their summed loss by
    :meth:`step_mean`."""

    class StepBatchTrainer(base):  # type: ignore[misc, valid-type]
        # compute_loss returns the micro-batch's share of the step's mean: the Trainer adds the shares as they are
        loss_is_scaled_for_ga = True

        def examples_in(self, batch: Any) -> int:
            """The number of examples (the loss's unit of averaging) in a collated micro-batch."""
            raise NotImplementedError

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batch_samples: list[Any] = []
            for _ in range(num_batches):
                try:
                    batch_samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            examples = sum(self.examples_in(batch) for batch in batch_samples)
            if self.args.world_size > 1:  # the step's examples on every process: each process divides by all of them
                import torch

                count = torch.tensor(examples, device=device)
                examples = int(self.accelerator.gather(count.reshape(1)).sum())
            self._step_batch = StepBatch(batch_samples, examples)
            return batch_samples, examples

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            step = self.__dict__.get("_step_batch")
            if step is not None:  # which of the step's micro-batches this is (the loop passes the same objects)
                step.current = next((i for i, b in enumerate(step.micro_batches) if b is inputs), 0)
            return super().training_step(model, inputs, num_items_in_batch)

        def current_step(self, model: Any) -> StepBatch | None:
            """The optimizer step being trained (None outside training: evaluation batches stand alone)."""
            return self.__dict__.get("_step_batch") if model.training else None

        def step_mean(self, total: Any, examples: int, num_items_in_batch: Any) -> Any:
            """``total`` (the summed loss of this micro-batch's ``examples`` examples) as its share of the step's
            mean; the plain mean outside the training loop (``num_items_in_batch`` None). In a distributed run
            the share is multiplied by the number of processes, whose gradients DDP averages."""
            if num_items_in_batch is None:
                return total / max(examples, 1)
            return total * self.accelerator.num_processes / max(int(num_items_in_batch), 1)

    return StepBatchTrainer

