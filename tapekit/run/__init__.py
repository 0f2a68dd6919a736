"""The outer loop and what it drives.

`controller` (how long to train; what happens between compiled loops), `runner` (the
`Runner` protocol: all the controller may ask of the engine), `engine` (the real runner:
strategy, build, compiled loops, input, checkpoints), `distribute` (choosing a
`tf.distribute` strategy: the only place tapekit touches devices) and `evaluator` (the
evaluator job beside a training job). Eager, once per loop, on every worker.
"""
