"""What a run saves, where, and how it comes back.

`state` (every variable a trainer owns, and tapekit's own checkpoint keys), `checkpointing`
(the `Checkpointer`: saves, checked restores; the latest checkpoint and its step), `damaged`
(checkpoints a run must not resume from, found and moved aside), `resume` (starting where a
run left off), `record` (`run.json`, `flags.txt`: the check that a resumed run is the same
run), `best` (MODEL_DIR/best/), `files` (writes that symlinks cannot redirect) and `export`
(SavedModels). Eager, between loops, on every worker unless a docstring says chief.
"""
