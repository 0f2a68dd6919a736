"""One training job per model_dir: a claim file the job holds while it trains.

A second job on a model_dir (a requeued batch job starting while the old one still runs)
is refused before it writes anything, in one line naming the holder. A holder that died
does not block the requeue: the next job takes over by itself when the holder is provably
gone (same machine, and its pid no longer runs, or runs another process: the process start
time in /proc/PID/stat is compared, against pid reuse) or has stopped renewing its claim
(its heartbeat is older than `STALE_AFTER_HEARTBEATS` (3) heartbeat intervals: 90 s by
default), and says so in one line. Another machine's claim whose heartbeat is recent by its
clock is watched on ours for up to that time (clocks disagree): renewed, the job is refused;
not renewed, it is taken over.

`flock`/`fcntl` locks are unreliable on NFS, so the claim is a file, MODEL_DIR/training.claim
(JSON: host, pid, process start, boot id, started, heartbeat, heartbeat_secs, token),
created whole and atomically (written beside it, then `os.link`ed into place: fails if it
exists, atomic on NFSv3+). A daemon thread renews it every `heartbeat_secs` (30; the
environment variable TAPEKIT_CLAIM_HEARTBEAT_SECS sets it) by writing it beside and
`os.replace`-ing it, after checking that it is still this job's (a holder stalled for the
stale time between that check and the replace would overwrite a taker's claim; the taker
then finds it lost and exits, so one writer remains). The training loop itself
does nothing per step. Taking over a stale claim is race-free between two takers: each
hard-links the claim it judged stale to a name made of that claim's bytes; only one link
succeeds, and the taker then checks that the link holds the bytes it judged (a holder that
renewed meanwhile is alive) before it removes the claim and creates its own.

A holder whose heartbeat stalled long enough to be taken over (a job suspended with
SIGSTOP, a machine that froze) finds at its next heartbeat that the claim is another job's
and ends its process at once (exit code 2), without writing anything more: the job that
took over is the only writer.

Who holds it: `held_for_training` is entered by `Engine.fit` (each `fit`, from the Python API
or the command line's train modes) and leaves at its end, whatever the end (returned,
raised, SIGTERM or Ctrl-C saved and stopped); a notebook's next `fit` takes it again (held
until the trainer is collected instead, a notebook that makes a new Trainer on the same
model_dir while IPython still references the old one would be refused by its own kernel). A
process killed outright leaves its claim behind, for the next job to take over. Only the
chief of several workers holds it: the others write only into temporary directories of
their own, and the chief's refusal is shared with them (one collective), so that all exit
with one line instead of waiting on a chief that is gone. Evaluation (`evaluate`,
`restore`, the evaluator beside a training job) only reads the checkpoints and never takes
it. A model_dir with a scheme (gs://, ...) is not locked (one warning): object stores cannot
create a file only-if-absent through `tf.io.gfile`, so two jobs cannot be told apart there.
"""

import contextlib
import datetime
import errno
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

from absl import logging

from tapekit.errors import EXIT_ERROR, TapekitError

CLAIM_FILE = "training.claim"
HEARTBEAT_ENVIRONMENT = "TAPEKIT_CLAIM_HEARTBEAT_SECS"
DEFAULT_HEARTBEAT_SECS = 30.0
# A claim not renewed for this many heartbeat intervals is stale (room for a slow disk).
STALE_AFTER_HEARTBEATS = 3
_ATTEMPTS = 50  # creations and take-overs raced and lost to other jobs before giving up
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK)


def heartbeat_secs() -> float:
    """The heartbeat interval this process renews its claim at."""
    value = os.environ.get(HEARTBEAT_ENVIRONMENT)
    try:
        seconds = float(value) if value else DEFAULT_HEARTBEAT_SECS
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise TapekitError(f"{HEARTBEAT_ENVIRONMENT}={value!r} is not a positive number of seconds.")
    return seconds


@contextlib.contextmanager
def held_for_training(engine):
    """Holds `engine.model_dir` (the chief, when there is one) while the block trains; raises
    one TapekitError, on every worker, when another job holds it. Eager."""
    from tapekit.run import distribute  # TensorFlow: imported when training, not with faults

    claim, refused = None, None
    model_dir = engine.model_dir
    if model_dir and distribute.is_chief(engine.strategy):
        if "://" in str(model_dir):
            logging.warning("model_dir %s is on an object store, which cannot create a file only "
                            "if it is absent: a second job on it is not refused, so run one "
                            "training job at a time there", model_dir)
        else:
            try:
                claim = Claim.take(model_dir)
            except TapekitError as error:
                refused = error
    if distribute.is_multi_worker(engine.strategy) and distribute.any_worker(
            engine.strategy, refused is not None) and refused is None:
        refused = TapekitError(
            f"the chief was refused model_dir {model_dir}: another training job holds it (the "
            "chief's log names it); stop that job or use another --model_dir.")
    if refused is not None:
        raise refused
    try:
        yield claim
    finally:
        if claim is not None:
            claim.release()


class Claim:
    """This process's claim on a model_dir, renewed by a daemon thread until `release`."""

    def __init__(self, path: str, content: Dict[str, Any]):
        self.path = path
        self.content = content
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_released, daemon=True,
                                        name="tapekit-claim-heartbeat")
        self._thread.start()

    @classmethod
    def take(cls, model_dir: str, interval: Optional[float] = None) -> "Claim":
        """Creates MODEL_DIR/training.claim, taking over a holder that is gone or stale;
        raises TapekitError (one line naming the holder) when a live job holds it."""
        path = os.path.join(model_dir, CLAIM_FILE)
        content = dict(_this_process(), started=_now(), token=uuid.uuid4().hex,
                       heartbeat_secs=interval or heartbeat_secs())
        content["heartbeat"] = content["started"]
        watched: Optional[Tuple[bytes, float]] = None  # another machine's claim, first seen
        attempts = 0  # watching a claim is not an attempt
        while attempts < _ATTEMPTS:
            if _create(path, _encode(content)):
                return cls(path, content)
            raw = _read(path)
            if raw is None:  # released meanwhile
                attempts += 1
                continue
            holder = _decode(raw)
            verdict, reason = judge(holder, _age(holder, path))
            if verdict == ANOTHER_MACHINE:
                # Its heartbeat is recent by its clock: watch it on ours, until it renews
                # (alive) or stays the same for the stale time (stopped renewing).
                stale_after = _stale_after(holder)
                if watched is None:
                    watched = (raw, time.monotonic())
                    logging.info("model_dir %s is claimed by %s; waiting up to %g s for it to "
                                 "renew its claim or go stale", model_dir, describe(holder),
                                 stale_after)
                waited = time.monotonic() - watched[1]
                if raw != watched[0]:
                    verdict = ALIVE
                elif waited >= stale_after:
                    verdict, reason = STALE, (f"stopped renewing its claim (not renewed in the "
                                              f"{waited:.1f} s this job watched it, stale after "
                                              f"{stale_after:g} s)")
                else:
                    time.sleep(min(1.0, stale_after / 10))
                    continue
            if verdict == ALIVE:
                raise TapekitError(
                    f"model_dir {model_dir} is held by another training job ({describe(holder)}); "
                    "wait for it to end or stop it, or train in another --model_dir (an "
                    "evaluator, --mode=continuous_evaluate, may run beside it). Nothing was "
                    "written.")
            attempts += 1
            if _move_aside(path, raw, _stale_after(holder)):
                logging.warning("taking over model_dir %s from a job that %s (%s)", model_dir,
                                reason, describe(holder))
            else:
                time.sleep(0.05)  # another job is taking it over, or the holder renewed
        raise TapekitError(f"model_dir {model_dir} kept being claimed by other jobs while this one "
                           f"tried to claim it ({path}); run one training job per model_dir.")

    def release(self) -> None:
        """Stops renewing and removes the claim if it is still this job's."""
        self._stop.set()
        self._thread.join(timeout=10)
        if _token(_read(self.path)) == self.content["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _renew_until_released(self) -> None:
        warned = False
        while not self._stop.wait(self.content["heartbeat_secs"]):
            try:
                holder = _decode(_read(self.path) or b"")
                if holder.get("token") != self.content["token"] and not self._stop.is_set():
                    self._lost(holder)
                    return
                self.content["heartbeat"] = _now()
                _write_beside_and_replace(self.path, _encode(self.content))
                warned = False
            except (OSError, TapekitError) as error:  # a full or failing disk: others may take over
                if not warned:
                    logging.warning("could not renew the claim %s (%s); another job may take the "
                                    "model_dir over after %g s", self.path,
                                    getattr(error, "strerror", None) or error,
                                    _stale_after(self.content))
                warned = True

    def _lost(self, holder: Dict[str, Any]) -> None:
        taker = describe(holder) if holder else "its claim file is gone"
        sys.stderr.write(
            f"tapekit: error: the claim on model_dir {os.path.dirname(self.path)} is no longer "
            f"this job's ({taker}): another job took it over, as this one had not renewed it in "
            f"{_stale_after(self.content):g} s (suspended?); exiting at once, writing nothing "
            "more.\n")
        sys.stderr.flush()
        os._exit(EXIT_ERROR)


# What `judge` finds a holder to be.
ALIVE = "alive"  # refuse
GONE = "gone"  # take over at once
STALE = "stale"  # take over
ANOTHER_MACHINE = "another machine"  # fresh by its own clock: watch it


def judge(holder: Dict[str, Any], age: Optional[float]) -> Tuple[str, str]:
    """What a claim's holder is (ALIVE, GONE, STALE or ANOTHER_MACHINE) and why, from
    the claim (`holder`) and its heartbeat's age in seconds (None: unreadable)."""
    stale_after = _stale_after(holder)
    if age is not None and age > stale_after:
        return STALE, f"stopped renewing its claim (stale after {stale_after:g} s)"
    if not holder or not _same_machine(holder):
        return ANOTHER_MACHINE, ""
    pid, start = holder.get("pid"), holder.get("process_start")
    running = _process_start(pid) if isinstance(pid, int) else None
    if running is None:
        return GONE, "is gone (its pid no longer runs)"
    if start is not None and running != start:
        return GONE, "is gone (its pid now runs another process)"
    return ALIVE, ""


def describe(holder: Dict[str, Any]) -> str:
    """The holder in a few words: host, pid, when it started, its last heartbeat."""
    if not holder:
        return "an unreadable claim"
    age = _age(holder, None)
    heartbeat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}{heartbeat}")


def _this_process() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid()), "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace()}


def _same_machine(holder: Dict[str, Any]) -> bool:
    """Whether this process sees the holder's pids (same host name, boot and pid namespace)."""
    return (holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id()
            and holder.get("pid_namespace") == _pid_namespace())


def _process_start(pid: int) -> Optional[str]:
    """Process `pid`'s start time (clock ticks since boot, /proc/PID/stat's 22nd field), ''
    where there is no /proc; None if no such process runs (a zombie is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        pass
    except (OSError, IndexError):
        return ""
    if os.path.isdir("/proc/self"):
        return None
    try:  # no /proc (macOS): whether the pid runs, not which process it is
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return ""


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as stream:
            return stream.read().strip()
    except OSError:
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _stale_after(holder: Dict[str, Any]) -> float:
    """The holder's own promise: it renews every heartbeat_secs it wrote."""
    interval = holder.get("heartbeat_secs") if holder else None
    if not isinstance(interval, (int, float)) or interval <= 0:
        interval = heartbeat_secs()
    return STALE_AFTER_HEARTBEATS * float(interval)


def _age(holder: Dict[str, Any], path: Optional[str]) -> Optional[float]:
    """Seconds since the holder's last heartbeat (by its clock; an unreadable claim: since
    the file was last written), None if unknown."""
    try:
        beat = datetime.datetime.fromisoformat(holder["heartbeat"]).timestamp()
    except (KeyError, TypeError, ValueError):
        if path is None:
            return None
        try:
            beat = os.stat(path).st_mtime
        except OSError:
            return None
    return time.time() - beat


def _encode(content: Dict[str, Any]) -> bytes:
    return (json.dumps(content, indent=1) + "\n").encode()


def _decode(raw: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token(raw: Optional[bytes]) -> Optional[str]:
    return _decode(raw).get("token") if raw else None


def _read(path: str) -> Optional[bytes]:
    """The claim's bytes, None if there is none (a link in its place is not followed)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise TapekitError(f"cannot read the claim {path} ({error.strerror or error}); remove it "
                           "if no training job runs in this model_dir.") from None
    with os.fdopen(descriptor, "rb") as stream:
        return stream.read()


def _write_new(path: str, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _create(path: str, data: bytes) -> bool:
    """Creates `path` holding `data`, whole, only if it does not exist (link: atomic on NFS)."""
    beside = f"{path}.{uuid.uuid4().hex}.new"
    try:
        _write_new(beside, data)
    except OSError as error:
        raise TapekitError(f"cannot write the claim {path} ({error.strerror or error}); choose a "
                           "writable --model_dir.") from None
    try:
        os.link(beside, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise TapekitError(f"cannot write the claim {path} ({error.strerror or error}); "
                               "choose a writable --model_dir.") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(beside)
    try:  # a file system without hard links (some FUSE mounts): O_EXCL, atomic on NFSv3+ too
        _write_new(path, data)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        raise TapekitError(f"cannot write the claim {path} ({error.strerror or error}); choose a "
                           "writable --model_dir.") from None


def _write_beside_and_replace(path: str, data: bytes) -> None:
    beside = f"{path}.{uuid.uuid4().hex}.renew"
    _write_new(beside, data)
    try:
        os.replace(beside, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(beside)
        raise


def _move_aside(path: str, judged: bytes, stale_after: float) -> bool:
    """Removes the claim at `path` if it still holds the bytes `judged` stale; False when
    another job is taking it over or the holder renewed it (judge again)."""
    aside = f"{path}.{hashlib.sha1(judged).hexdigest()[:16]}.taken"
    try:
        os.link(path, aside)  # one taker of these bytes wins
    except FileNotFoundError:
        return False
    except FileExistsError:  # another taker's, or one that died half-way (long ago)
        with contextlib.suppress(OSError):
            if time.time() - os.stat(aside).st_ctime > stale_after:
                os.unlink(aside)
        return False
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise TapekitError(f"cannot take over the claim {path} ({error.strerror or error}); "
                               "choose a writable --model_dir.") from None
        return _rename_aside(path, judged)
    try:
        if _read(aside) != judged:  # the holder renewed between our read and the link
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(aside)


def _rename_aside(path: str, judged: bytes) -> bool:
    """`_move_aside` without hard links: a rename to a name of this job's own (only one
    rename of the claim succeeds); a claim renewed meanwhile is put back."""
    aside = f"{path}.{uuid.uuid4().hex}.taken"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if _read(aside) == judged:
            return True
        with contextlib.suppress(OSError):  # not if a new claim was created meanwhile
            if not os.path.exists(path):
                os.rename(aside, path)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(aside)
