"""What a run saves, where, and how it comes back.

`state` (every variable a trainer owns), `checkpointing` (the `Checkpointer`: saves, checked
restores, damaged checkpoints), `resume` (starting where a run left off), `record`
(`run.json`, `flags.txt`: the check that a resumed run is the same run), `best`
(MODEL_DIR/best/), `files` (writes that symlinks cannot redirect) and `export`
(SavedModels). Eager, between loops, on every worker unless a docstring says chief.
"""
