"""What goes wrong in an unattended job, and what tapekit does about it.

`stop` (SIGTERM and Ctrl-C: stop at the next step, save), `between_loops` (an exception
after a loop: save that loop first, then one line), `nonfinite` (`nan_policy`'s check of a
loop) and `rollback` (go back after a bad loop, find its batches, skip them). Each policy
is a hook the outer loop (`tapekit.run.controller`) calls; none is a branch inside it.
`lock` keeps a second training job out of a model_dir while one trains (`Engine.fit`).
"""
