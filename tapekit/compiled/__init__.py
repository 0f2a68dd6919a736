"""What runs inside `tf.function`: the user's step made into one compiled, in-graph loop.

`loop` (the inner loop: steps in a `tf.range`, per replica under `strategy.run`), `build`
(the one trace of the step before step 1 that creates every variable), `tracing` (the
context a step runs in), `means` (exact means over replicas and partial batches), `updates`
(gradients to `optimizer.apply_gradients`: clipping, accumulation, loss scaling),
`precision`, `randomness` (per-replica seeds) and `xla`. Code here is traced: it runs once
per trace, on symbolic tensors, per replica unless its docstring says otherwise.
"""
