"""The one exception type tapekit raises for mistakes a user can fix."""


class TapekitError(Exception):
    """A user-facing error: one line saying what was wrong and what to do.

    The command line prints only this line (no traceback) and exits non-zero.
    """


def user_message(error: BaseException) -> str:
    """The one-line message of `error`, without what AutoGraph adds when it re-raises.

    An error raised while a `tf.function` is traced comes back with "in user code:" and
    a stack prepended; its last line is the original `TapekitError: message`.
    """
    text = str(error).strip()
    last = text.splitlines()[-1].strip() if text else ""
    prefix = "TapekitError: "
    return last[len(prefix):] if last.startswith(prefix) else last
