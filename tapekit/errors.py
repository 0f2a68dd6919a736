"""The one exception type tapekit raises for mistakes a user can fix, and message helpers."""

import re


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


def summarize(error: BaseException) -> str:
    """The most informative single line of an exception from TensorFlow or Keras.

    Keras wraps layer errors as "Exception encountered when calling X.call()." followed by
    the real message (in ANSI bold) and the arguments; this returns the real message.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    # AutoGraph puts "in user code:" and the user's frames before the original message.
    original = list(re.finditer(r"^\s*(?:[\w.]+(?:Error|Exception)): ", text, re.M))
    if "in user code:" in text and original:
        text = text[original[-1].end():]
    # Keras' symbolic build of a Sequential wraps a layer's error after "Error encountered:".
    text = text.split("Error encountered:", 1)[-1]
    lines = [line.strip() for line in text.splitlines()]
    useful = [line for line in lines if line and not line.startswith(
        ("Exception encountered when calling", "Arguments received by", "•"))]
    return useful[0] if useful else type(error).__name__
