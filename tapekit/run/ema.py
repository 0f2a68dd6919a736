"""An optimizer's `use_ema=True`, as Keras `fit` gives it: the models end on the averages.

Keras optimizers built with `use_ema=True` keep an exponential moving average of the
variables they update (updated in the step, checkpointed with the optimizer). Keras `fit`
ends by copying the averages into the model (`finalize_variable_values`); tapekit does the
same at the end of each `fit` and of `restore`, so evaluation afterwards, `export` and
`tapekit-export` see the averaged weights. Training itself always runs on the raw weights:
they are kept on the host while the averages are in the models and put back at the start
of the next `fit`, which so continues exactly where the raw weights were. Checkpoints are
saved during `fit`, on the raw weights (with the averages in the optimizer), so a resumed
run ends bit for bit where an uninterrupted one does. During `fit`, each evaluation runs
on both: the raw weights' metrics as `X`, the averages' as `ema_X` (`eval_X`,
`eval_ema_X` in `best_metric` and `early_stopping_metric`). Eager, on every worker.
"""

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PREFIX = "ema_"  # an evaluation metric of the averaged weights


class EmaWeights:
    """The `(optimizer, variables)` pairs whose optimizer keeps averages (`use_ema`), each
    with the variables it was built on, in that order."""

    def __init__(self, pairs: Sequence[Tuple[object, List]] = ()):
        self.pairs = [(optimizer, list(variables)) for optimizer, variables in pairs
                      if getattr(optimizer, "use_ema", False)]
        self._raw: Optional[List[List]] = None  # the raw values while the averages are in

    @property
    def swapped_in(self) -> bool:
        """Whether the models hold the averages now (after `fit` or `restore`)."""
        return self._raw is not None

    def swap_in(self) -> None:
        """The models take the averages; their raw values are kept to put back."""
        if not self.pairs or self._raw is not None:
            return
        self._raw = [[variable.numpy() for variable in variables] for _, variables in self.pairs]
        for optimizer, variables in self.pairs:
            optimizer.finalize_variable_values(variables)

    def swap_out(self) -> None:
        """The models take their raw values back (what training continues from)."""
        if self._raw is None:
            return
        for (_, variables), values in zip(self.pairs, self._raw):
            for variable, value in zip(variables, values):
                variable.assign(value)
        self._raw = None

    @contextlib.contextmanager
    def averaged(self):
        """The averages in the models for a while (an evaluation, an export of best/)."""
        already = self.swapped_in
        self.swap_in()
        try:
            yield
        finally:
            if not already:
                self.swap_out()

    def evaluated(self, evaluate: Callable[[], Dict[str, float]]) -> Dict[str, float]:
        """`evaluate()`'s metrics; on the raw weights of a run with averages, those of the
        averages too, as `ema_X`."""
        metrics = evaluate()
        if not self.pairs or self.swapped_in:
            return metrics
        with self.averaged():
            averaged = evaluate()
        return {**metrics, **{PREFIX + name: value for name, value in averaged.items()}}

    def metric_names(self, names: Sequence[str]) -> List[str]:
        """The names `evaluated` reports for an evaluation reporting `names`."""
        return list(names) + ([PREFIX + name for name in names] if self.pairs else [])
