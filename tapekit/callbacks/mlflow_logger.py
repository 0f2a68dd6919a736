"""Logs a run to MLflow with MLflow's own client, off the training thread."""

import importlib.util
import logging as pylogging
import os
import queue
import re
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from absl import logging

from tapekit.callbacks.base import Callback
from tapekit.callbacks.loggers import numbers, run_settings
from tapekit.checkpoint import files
from tapekit.checkpoint import record as record_lib
from tapekit.errors import TapekitError

# For the client tapekit makes, unless the user set them: a tracker that is down or hung
# costs the sending thread seconds, not minutes (MLflow's defaults: 120 s, 7 retries with
# backoff factor 2).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_END = object()
THREAD_NAME = "tapekit-mlflow"
_KEY = re.compile(r"[^\w\-. /]")  # what MLflow allows in a metric or param name


class MlflowLogger(Callback):
    """Logs a run's settings, metrics and files to an MLflow run (the chief only).

    * Tracking URI: MLflow's (`MLFLOW_TRACKING_URI`, `mlflow.set_tracking_uri`); when none is
      set, `sqlite:///PARENT/mlflow.db` beside the model_dir (PARENT is its parent folder;
      artifacts in PARENT/mlartifacts), so the runs of one folder share a store that
      `mlflow ui --backend-store-uri sqlite:///PARENT/mlflow.db` shows. A model_dir on an
      object store falls back on MLflow's own default.
    * Experiment: `experiment`, else `MLFLOW_EXPERIMENT_NAME`, else PARENT's name.
    * Params: `run_settings` (run.json flattened), each value cut to MLflow's 6000
      characters. A resumed run adds the params that are new; a changed value (a longer
      `train_steps`) stays as first logged, since MLflow cannot change a param (run.json,
      logged as an artifact, lists each resume's changes).
    * Metrics, with step = the global step: each loop's as `train/NAME`, each evaluation's
      as `eval/NAME`, a loop's time and memory under their own names (`time/...`,
      `memory/...`), a profile's numbers as `profile/NAME`.
    * Resume: the run's id is kept in run.json (`logger_runs.mlflow.run_id`); a later `fit`
      on the model_dir continues that run. A key's steps only go up: a resume from a
      checkpoint older than the last step logged trains those steps again but does not log
      them again (MLflow cannot delete points; tapekit's resume is exact, so the first
      values stand). What a killed job had not sent is not sent later.
    * Artifacts: an experiment tapekit creates on a local sqlite store keeps its artifacts
      beside the store (DB_FOLDER/mlartifacts), as does the store tapekit makes when it
      creates the database file (its "Default" experiment too), not in ./mlruns under the
      current folder (MLflow's default); a file store keeps them inside itself.
    * At the end: run.json and MODEL_DIR/best/ as artifacts, then the status: FINISHED, or
      FAILED when `fit` raised, or KILLED when the run stopped to be resumed: by SIGTERM or
      Ctrl-C (`preempted`, `interrupted`; then only run.json is uploaded, time being short)
      or when `max_time` was used up (`stopped_by_time`: a job's time limit, resumed by the
      next job like a preemption). The whole end (the metrics still queued, the artifacts,
      the status) shares one deadline, `flush_timeout_secs` (2 s after a second Ctrl-C);
      what is left then is dropped and counted, and the run may stay RUNNING there.

    Everything MLflow is asked runs on a background thread fed by a bounded queue: training
    never waits for the tracker. When the tracker is unreachable (down at the start, or
    stopped during the run) the thread logs one warning and goes on; what it could not send,
    or what did not fit in the queue, is dropped and counted in one line at the end; a
    tracker that cannot be reached is tried again every 30 s, a tracking URI MLflow does
    not support is said once and not tried again. One logger has at most one such thread:
    one that missed the end's deadline is told to stop, and the next `fit`'s thread waits
    for it before it talks to the tracker.

    `HTTP_SETTINGS` (a 5 s timeout, 1 retry, backoff factor 1 for HTTP requests) are put in
    `os.environ` by `on_train_begin`, for the whole process, each only when unset
    (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR): MLflow's client reads them from the environment.
    """

    def __init__(self, model_dir: str, experiment: Optional[str] = None,
                 tracking_uri: Optional[str] = None, queue_size: int = 1000,
                 flush_timeout_secs: float = 30.0):
        if importlib.util.find_spec("mlflow") is None:
            raise TapekitError("loggers=mlflow needs MLflow, which is not installed: "
                               "pip install 'tapekit[mlflow]'")
        self.model_dir = model_dir
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.flush_timeout_secs = flush_timeout_secs
        self.run_id: Optional[str] = None
        self.dropped = 0  # metric points not sent (tracker unreachable, queue full)
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self._thread: Optional[threading.Thread] = None
        self._sender: Optional["_Sender"] = None
        self._recorded: Optional[str] = None  # the run id run.json holds
        self._uri: Optional[str] = None  # the tracking URI, once the thread has chosen it
        self._warned = False
        self._lock = threading.Lock()
        self._ending = threading.Event()  # on_train_end: a failing tracker is not waited for

    # ------------------------------------------------------------------ the training thread

    def on_train_begin(self, step):
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        retries = pylogging.getLogger("urllib3.connectionpool")
        if not any(isinstance(item, _NotFromSender) for item in retries.filters):
            retries.addFilter(_NotFromSender())  # its "Retrying" lines: the one warning says it
        recorded = (record_lib.read(self.model_dir) or {}).get("logger_runs", {}).get("mlflow", {})
        self._recorded = recorded.get("run_id")
        self.dropped, self._warned = 0, False
        self._queue = queue.Queue(maxsize=self._queue.maxsize)
        self._ending = threading.Event()
        previous = self._sender
        if previous is not None:  # one that missed an earlier end: it stops, then this one starts
            previous.stop.set()
        sender = self._sender = _Sender(self, self._queue, self._ending, self._recorded,
                                        run_settings(self.model_dir), previous)
        self._thread = sender.thread = threading.Thread(target=sender.run, name=THREAD_NAME,
                                                        daemon=True)
        self._thread.start()

    def on_loop_end(self, step, logs):
        self._send(step, {f"train/{name}": value for name, value in logs.items()})

    def on_eval_end(self, step, logs):
        self._send(step, {f"eval/{name}": value for name, value in logs.items()})

    def on_loop_stats(self, step, stats):
        self._send(step, stats)

    def on_profile(self, step, analysis):
        self._send(step, {f"profile/{name}": value for name, value in numbers(analysis).items()})

    def on_train_end(self, step, logs):
        trainer = self.trainer
        signal = bool(getattr(trainer, "preempted", False) or getattr(trainer, "interrupted", False))
        if signal:  # time is short: run.json only
            self._finish("KILLED", best=False)
        else:
            self._finish("KILLED" if getattr(trainer, "stopped_by_time", False) else "FINISHED")

    def on_exception(self, step, error):
        if isinstance(error, Exception):
            self._finish("FAILED")
        else:  # a second Ctrl-C asks to leave at once
            self._finish("KILLED", min(self.flush_timeout_secs, 2.0), best=False)

    def _send(self, step: int, values: Dict[str, Any]) -> None:
        self._record_run_id()
        points = {name: float(value) for name, value in values.items()
                  if isinstance(value, (int, float)) or hasattr(value, "__float__")}
        if self._thread is None:  # after on_train_end (a callback that logs at its own end)
            self._send_after_end((int(step), time.time(), points))
            return
        try:
            self._queue.put_nowait((int(step), time.time(), points))
        except queue.Full:
            self._drop(len(points), "the queue to the tracker is full")

    def _send_after_end(self, item) -> None:
        """Sends `item` on a thread of its own, waited for until the end's deadline; not when
        the run never reached the tracker, the tracker was failing at the end or the
        deadline has passed."""
        sender = self._sender
        left = (sender.deadline - time.monotonic()) if sender and sender.deadline else 0.0
        if (sender is None or sender.run_id is None or sender.client is None or sender.failing
                or sender.stop.is_set() or left <= 0):
            self._drop(len(item[2]), "the MLflow tracker is unreachable")
            return
        thread = threading.Thread(target=sender.send, args=([item],), name=THREAD_NAME,
                                  daemon=True)
        thread.start()
        thread.join(left)

    def _finish(self, status: str, wait_secs: Optional[float] = None, best: bool = True) -> None:
        """Queues the end (the status; `best`: upload MODEL_DIR/best/ too) and waits up to
        `wait_secs` (`flush_timeout_secs`) for the thread: one deadline for the metrics
        still queued, the artifacts and the status. A thread still busy then is told to
        stop (it makes no further call to the tracker)."""
        if self._thread is None:
            return
        wait_secs = self.flush_timeout_secs if wait_secs is None else wait_secs
        deadline = time.monotonic() + wait_secs
        if self._sender is not None:
            self._sender.deadline = deadline
        self._ending.set()
        try:  # waits for room: the end (status, artifacts) is sent after every loop's metrics
            self._queue.put((_END, status, best), timeout=wait_secs)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._record_run_id()
        if self._thread.is_alive():
            if self._sender is not None:
                self._sender.stop.set()
            left = sum(len(item[2]) for item in list(self._queue.queue) if item[0] is not _END)
            self._drop(left, f"the MLflow tracker did not take the run's end within {wait_secs:g} s")
        if self.dropped:
            logging.warning("mlflow: %d metric value(s)%s were not logged (the tracker was "
                            "unreachable or slow)", self.dropped,
                            f" of run {self.run_id}" if self.run_id else "")
        self._thread = None

    def _record_run_id(self) -> None:
        """Keeps the run's id in run.json once the thread has it (written from this thread
        only, as every other run.json write)."""
        run_id = self.run_id
        if run_id is not None and run_id != self._recorded:
            record_lib.record_logger(self.model_dir, "mlflow", {
                "run_id": run_id, "tracking_uri": self._uri})
            self._recorded = run_id

    def _drop(self, count: int, why: str) -> None:
        with self._lock:
            self.dropped += count
            warned, self._warned = self._warned, True
        if not warned:
            logging.warning("mlflow: %s; training goes on without it (what is not logged is "
                            "counted and dropped)", why)


class _NotFromSender(pylogging.Filter):
    def filter(self, record):
        return record.threadName != THREAD_NAME


class _Sender:
    """The background thread's side: owns the client, the run and the last step per key."""

    RETRY_START_SECS = 30.0  # a tracker down at the start is tried again this often

    def __init__(self, logger: MlflowLogger, items: "queue.Queue", ending: threading.Event,
                 run_id: Optional[str], params: Dict[str, Any],
                 previous: Optional["_Sender"] = None):
        self.logger = logger
        self.items = items
        self.ending = ending
        self.run_id = run_id
        self.params = params
        self.previous = previous  # an earlier fit's sender, told to stop: waited for first
        self.client = None
        self.last_step: Dict[str, int] = {}
        self.failing = False
        self.unsupported = False  # a tracking URI that can never work: not tried again
        self.tried = 0.0
        self.stop = threading.Event()  # set when the end's deadline passed: no further call
        self.deadline: Optional[float] = None  # the end's (time.monotonic())
        self.thread: Optional[threading.Thread] = None

    def run(self) -> None:
        previous = self.previous
        if previous is not None and previous.thread is not None:
            previous.thread.join()  # it makes no further call; at most its last one ends
        self.previous = None
        started = self._start()
        while not self.stop.is_set():
            try:
                items = [self.items.get(timeout=0.5)]
            except queue.Empty:
                continue
            while items[-1][0] is not _END and len(items) < 100:
                try:
                    items.append(self.items.get_nowait())
                except queue.Empty:
                    break
            metrics = [item for item in items if item[0] is not _END]
            try:
                if metrics:
                    if (not started and not self.unsupported
                            and time.monotonic() - self.tried >= self.RETRY_START_SECS):
                        started = self._start()
                    if started and not (self.failing and self.ending.is_set()):
                        self.send(metrics)
                    else:
                        self.logger._drop(sum(len(points) for _, _, points in metrics),
                                          "the MLflow tracker is unreachable")
                if items[-1][0] is _END:  # a tracker that is down is not waited for at the end
                    if not self.failing and (started or self._start()):
                        self._end(items[-1][1], items[-1][2])
                    return
            except Exception as error:  # a bug or a client surprise: keep draining and counting
                self._failed("log", error)
                self.logger._drop(sum(len(points) for _, _, points in metrics), "")
                if items[-1][0] is _END:
                    return

    def _failed(self, what: str, error: BaseException) -> None:
        self.failing = True
        first = (str(error).strip().splitlines() or [""])[0][:200]
        self.logger._drop(0, f"the MLflow tracker at {self.logger._uri} failed to {what} "
                             f"({type(error).__name__}: {first})")

    def _call(self, what: str, function, *args, **kwargs):
        """`function(...)`, or None after warning once (the tracker is unreachable), or
        without calling once the end's deadline has passed or the thread is told to stop."""
        if self.stop.is_set() or (self.deadline is not None and time.monotonic() > self.deadline):
            return None
        try:
            result = function(*args, **kwargs)
        except Exception as error:  # any client error: the run goes on without MLflow
            self._failed(what, error)
            return None
        self.failing = False
        return result if result is not None else True

    def _start(self) -> bool:
        """Connects, and continues the recorded run or starts one. False: not now (the
        tracker is unreachable; `unsupported`: never)."""
        self.tried = time.monotonic()
        if self.stop.is_set():
            return False
        try:
            return self._connect()
        except Exception as error:  # no client (an unsupported URI, a store that cannot be made)
            self.failing = True
            first = (str(error).strip().splitlines() or [""])[0][:200]
            if "unsupported" in type(error).__name__.lower() or "unsupported uri" in first.lower():
                self.unsupported = True
                self.logger._drop(0, f"MLflow does not support the tracking URI {self.logger._uri} "
                                     f"({type(error).__name__}), so nothing is sent to MLflow in "
                                     f"this run; set MLFLOW_TRACKING_URI to an http(s), sqlite or "
                                     f"file URI")
            else:
                self.logger._drop(0, f"no MLflow client for {self.logger._uri} "
                                     f"({type(error).__name__}: {first}); tried again every "
                                     f"{self.RETRY_START_SECS:g} s")
            return False

    def _connect(self) -> bool:
        uri, artifact_location = tracking_uri(self.logger.model_dir, self.logger.tracking_uri)
        self.logger._uri = uri
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        _make_sqlite_store(uri, artifact_location)
        self.client = MlflowClient(uri)
        run = None
        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    return self._call("find the recorded run", _raise, error) is not None
                logging.warning("mlflow: run %s, recorded in run.json, is not in %s; starting "
                                "a new run", self.run_id, uri)
            except Exception as error:  # e.g. a connection refused before MLflow wraps it
                return self._call("find the recorded run", _raise, error) is not None
        if run is None:
            run = self._create(artifact_location)
            if run is None:
                return False
        else:
            self._call("mark the run running", self.client.update_run, run.info.run_id, "RUNNING")
            for key in run.data.metrics:
                history = self._call("read a metric's history", self.client.get_metric_history,
                                     run.info.run_id, key)
                if history is None:
                    return False
                steps = [point.step for point in history] if history is not True else []
                self.last_step[key] = max(steps, default=-1)
        self.run_id = run.info.run_id
        self._log_params(run)
        self.logger.run_id = self.run_id
        logging.info("mlflow: logging to run %s of experiment %s at %s", self.run_id,
                     run.info.experiment_id, uri)
        return True

    def _create(self, artifact_location: Optional[str]):
        name = experiment_name(self.logger.model_dir, self.logger.experiment)
        experiment = self._call("read the experiment", self.client.get_experiment_by_name, name)
        if experiment is None:
            return None
        if experiment is True:  # none yet
            experiment_id = self._call("create the experiment", self.client.create_experiment,
                                       name, artifact_location=artifact_location)
            if experiment_id is None:
                return None
        else:
            experiment_id = experiment.experiment_id
        model_dir = self.logger.model_dir
        tags = {"mlflow.source.name": "tapekit",
                "tapekit.model_dir": model_dir if files.is_remote(model_dir) else os.path.abspath(model_dir)}
        return self._call("create a run", self.client.create_run, experiment_id,
                          tags=tags, run_name=os.path.basename(os.path.normpath(model_dir)))

    def _log_params(self, run) -> None:
        from mlflow.entities import Param
        known = run.data.params
        params = [Param(_key(name), str(value)[:6000]) for name, value in self.params.items()
                  if _key(name) not in known]
        for first in range(0, len(params), 100):
            self._call("log params", self.client.log_batch, self.run_id,
                       params=params[first:first + 100])

    def send(self, items: List[Tuple[int, float, Dict[str, float]]]) -> None:
        from mlflow.entities import Metric
        metrics, sent = [], {}
        for step, seconds, points in items:
            for name, value in points.items():
                key = _key(name)
                if step <= sent.get(key, self.last_step.get(key, -1)):
                    continue  # logged before this resume: steps only go up
                sent[key] = step
                metrics.append(Metric(key, value, int(seconds * 1000), step))
        for first in range(0, len(metrics), 1000):
            batch = metrics[first:first + 1000]
            if self._call("log metrics", self.client.log_batch, self.run_id, metrics=batch) is None:
                self.logger._drop(len(metrics) - first, "the MLflow tracker is unreachable")
                return
            for metric in batch:
                self.last_step[metric.key] = max(metric.step, self.last_step.get(metric.key, -1))

    def _end(self, status: str, best: bool = True) -> None:
        model_dir = self.logger.model_dir
        record = files.read_text(os.path.join(model_dir, record_lib.RECORD_FILE))
        if record is not None:
            import tempfile
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, record_lib.RECORD_FILE)
                with open(path, "w") as stream:
                    stream.write(record)
                self._call("log run.json", self.client.log_artifact, self.run_id, path)
        folder = os.path.join(model_dir, "best")
        if best and not files.is_remote(folder) and os.path.isdir(folder):
            self._call("log best/", self.client.log_artifacts, self.run_id, folder, "best")
        self._call("end the run", self.client.set_terminated, self.run_id, status)


def tracking_uri(model_dir: str, uri: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(the tracking URI to log to, the artifact location for an experiment created there):
    `uri`, else MLflow's when one is set, else sqlite:///PARENT/mlflow.db with artifacts in
    PARENT/mlartifacts (MLflow's own default when the model_dir has a scheme). A local
    sqlite URI's artifacts go to DB_FOLDER/mlartifacts; other stores' to MLflow's default
    (a file store: inside the store)."""
    import mlflow
    if not uri:
        if mlflow.is_tracking_uri_set() or files.is_remote(model_dir):
            uri = mlflow.get_tracking_uri()
        else:
            parent = os.path.dirname(os.path.abspath(model_dir))
            uri = f"sqlite:///{os.path.join(parent, 'mlflow.db')}"
    database = sqlite_path(uri)
    if database is None:
        return uri, None
    return uri, os.path.join(os.path.dirname(database), "mlartifacts")


def sqlite_path(uri: str) -> Optional[str]:
    """The absolute path of a local sqlite URI's database file (sqlite:///relative.db,
    sqlite:////absolute.db); None for any other URI (an in-memory database too)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = urllib.parse.unquote(uri[len(prefix):].split("?")[0])
    return os.path.abspath(path) if path and path != ":memory:" else None


def _make_sqlite_store(uri: str, artifact_location: Optional[str]) -> None:
    """Creates a local sqlite store that does not exist yet with `artifact_location` as its
    default artifact root, so that its "Default" experiment keeps artifacts there too (an
    MlflowClient would give it ./mlruns under the current folder)."""
    database = sqlite_path(uri)
    if database is None or artifact_location is None or os.path.exists(database):
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    os.makedirs(os.path.dirname(database), exist_ok=True)
    SqlAlchemyStore(uri, artifact_location)


def experiment_name(model_dir: str, experiment: Optional[str] = None) -> str:
    path = model_dir if files.is_remote(model_dir) else os.path.abspath(model_dir)
    return (experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            or os.path.basename(os.path.dirname(os.path.normpath(path))) or "Default")


def _raise(error: Exception):
    raise error


def _key(name: str) -> str:
    return _KEY.sub("_", str(name))[:250]
