"""Faults a running job meets between loops and inside one, and how it leaves the run.

Called by the controller (`tapekit.run.controller`) when a callback, a user hook it calls
(`sample_images`), an evaluation or an export raises after a loop completed. A failed write
(a full disk, a lost permission, a vanished file system: `tapekit.errors.write_failure`)
stops the job with one line naming the cause, the path and the last intact checkpoint, and
touches nothing saved. Anything else first saves a checkpoint of the last completed loop,
so that the work is not lost, then stops with the error's own line (naming the user's code).
"""

from tapekit.checkpoint import checkpointing
from tapekit.errors import TapekitError, WriteFailed, summarize, user_frame, user_message, write_failure
from tapekit.run import distribute


def stopped_by(engine, error: BaseException, step: int) -> TapekitError:
    """The one error to stop `engine`'s run with, after `error` was raised between loops at
    global step `step`; saves the loop's checkpoint first unless a write failed."""
    if distribute.stopped_workers(error, engine.strategy) is not None:
        return error  # other workers stopped: `distribute.peers_stopping_explained` says so
    cause = write_failure(error, engine.model_dir)
    if cause is not None:
        return WriteFailed(
            f"a write failed at step {step} ({cause}); the job stopped and nothing saved was "
            f"touched: the last intact checkpoint is {engine.latest_checkpoint or 'none'}. Free "
            "space (or restore the path's permission) and run the same command: it resumes "
            "from there.")
    if isinstance(error, TapekitError):
        what = user_message(error)
    else:
        where = user_frame(error)
        what = f"{type(error).__name__}{f' at {where}' if where else ''}: {summarize(error)}"
    return TapekitError(f"{what} (raised between loops at step {step}; {_save(engine, step)})")


def _save(engine, step: int) -> str:
    checkpointer = engine.checkpointer
    if checkpointer is None:
        return "nothing saved: no model_dir"
    if distribute.is_multi_worker(engine.strategy):  # the others would wait for it forever
        return f"not saved on one worker alone; the last checkpoint is {engine.latest_checkpoint}"
    latest = engine.latest_checkpoint
    if latest and checkpointing.step_of(latest) == step:
        return f"its checkpoint {latest} was saved"
    try:
        checkpointer.save(step)
        checkpointer.wait()
    except Exception as failure:  # a write failing too: say so, do not hide the first error
        return f"saving its checkpoint failed too ({type(failure).__name__}: {summarize(failure)})"
    return f"saved checkpoint {engine.latest_checkpoint} of that loop first"
