"""Which rounding AdaRound keeps for a layer or block: :class:`CheckpointSelection` (early
stopping on the held-out chunks, ``holdout_checkpoints``) picks among the roundings seen during
the optimization, then :class:`Comparison` sets the picked one against round-to-nearest
(``keep_nearest_if_worse``) and gives the MSE fields of the result. The pass itself is
:mod:`quantlib.ptq.adaround`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .adaround_config import AdaRoundConfig, checkpoint_iterations


class CheckpointSelection:
    """Early stopping on held-out chunks (``holdout_checkpoints``): after the step counts of
    :func:`~quantlib.ptq.adaround_config.checkpoint_iterations`, :meth:`after_step` scores the
    hard rounding of that moment with ``holdout_mse(codes)`` and keeps the best (the later one on
    a tie). With no checkpoints it does nothing and :meth:`chosen` returns the end's codes."""

    def __init__(self, config: AdaRoundConfig, holdout_mse: Callable[[Any], float]) -> None:
        self.at = set(checkpoint_iterations(config.num_iterations, config.holdout_checkpoints))
        self.holdout_mse = holdout_mse
        self.best_codes: Any = None
        self.best_mse = float("inf")
        self.best_iteration: int | None = None
        self.scores: list[dict[str, float | None]] = []

    @torch.no_grad()
    def after_step(self, steps_taken: int, codes: Callable[[], Any]) -> None:
        """Score the current rounding (``codes()``) when ``steps_taken`` is a checkpoint."""
        if steps_taken not in self.at:
            return
        current = codes()
        mse = self.holdout_mse(current)
        self.scores.append({"iteration": steps_taken, "holdout_mse": mse})
        if mse <= self.best_mse:
            self.best_codes, self.best_mse, self.best_iteration = current, mse, steps_taken

    def chosen(self, end_codes: Any) -> Any:
        """The best checkpoint's codes, or ``end_codes`` without checkpoints."""
        return end_codes if self.best_iteration is None else self.best_codes


@dataclass(frozen=True)
class Comparison:
    """Round-to-nearest against the AdaRounded weights: (nearest, adaround) output MSE on the
    first chunk (``fit``) and on the held-out chunks (``holdout``, None without them). With
    ``keep_nearest_if_worse`` the AdaRounded weights are dropped when they are worse, judged on
    the held-out chunks when there are any and on the first chunk otherwise."""

    fit: tuple[float, float]
    holdout: tuple[float, float] | None
    keep_nearest_if_worse: bool

    @classmethod
    def measure(cls, mse: Callable[[Any, tuple[int, ...]], float], nearest: Any, codes: Any,
                holdout: tuple[int, ...], keep_nearest_if_worse: bool) -> Comparison:
        """The comparison with ``mse(codes, chunk_indices)`` the output MSE of a layer's or a
        block's codes on those cached chunks."""
        def pair(chunks: tuple[int, ...]) -> tuple[float, float]:
            return mse(nearest, chunks), mse(codes, chunks)

        return cls(pair((0,)), pair(holdout) if holdout else None, keep_nearest_if_worse)

    @property
    def kept_nearest(self) -> bool:
        nearest, adaround = self.holdout if self.holdout is not None else self.fit
        return self.keep_nearest_if_worse and adaround > nearest

    def result_fields(self) -> dict[str, Any]:
        """The MSE fields of :class:`AdaRoundLayerResult` for the weights kept."""
        kept = self.kept_nearest
        fields: dict[str, Any] = {"mse_nearest": self.fit[0], "mse_adaround": self.fit[0] if kept else self.fit[1],
                                  "kept_nearest": kept}
        if self.holdout is not None:
            fields.update(holdout_mse_nearest=self.holdout[0],
                          holdout_mse_adaround=self.holdout[0] if kept else self.holdout[1])
        return fields
