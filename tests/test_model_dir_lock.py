"""One training job per model_dir (`tapekit.faults.lock`): a second job is refused before it
writes anything; a holder that is gone or stopped renewing is taken over by itself; only
the chief of several workers holds it; evaluation never takes it."""

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tapekit.errors import TapekitError
from tapekit.faults import lock

from helpers import TESTS, let_go, paused_cli, run_cli, start_cli, wait_for_pause

# A claim's heartbeat thread that raised would otherwise pass unseen.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

RUN = ["--trainer=resumable:Regression", "--train_steps=40", "--steps_per_loop=10",
       "--checkpoint_every_steps=10", "--progress=log"]


def _claim(model_dir):
    path = os.path.join(model_dir, lock.CLAIM_FILE)
    return json.loads(open(path).read()) if os.path.exists(path) else None


def _snapshot(model_dir):
    """Every file under `model_dir`: its size and modification time (what a write changes)."""
    found = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), model_dir)] = (stat.st_size,
                                                                           stat.st_mtime_ns)
    return found


def _rows(model_dir, name="metrics.jsonl"):
    rows = [json.loads(line) for line in open(os.path.join(model_dir, name))]
    return [row["step"] for row in rows if row["split"] != "stats"]


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("tapekit-train: error:")]


def _foreign_claim(model_dir, pid, heartbeat_age=0.0, heartbeat_secs=30.0, **changes):
    """Writes a claim as another job would have: this machine's unless `changes` say not."""
    beat = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=heartbeat_age)
    content = dict(lock._this_process(), pid=pid, process_start=lock._process_start(pid),
                   started="2026-01-01T00:00:00+00:00", token="theirs",
                   heartbeat=beat.isoformat(), heartbeat_secs=heartbeat_secs)
    content.update(changes)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, lock.CLAIM_FILE), "w") as stream:
        json.dump(content, stream)
    return content


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture
def live_process():
    """A process that runs until the test ends (a holder that is alive)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid runs nothing (until reused)
    return process.pid


# ---------------------------------------------------------------- the rule, in-process


def test_judge_tells_alive_gone_reused_stale_and_another_machine(live_process, dead_pid):
    here = lock._this_process()
    alive = dict(here, pid=live_process.pid, process_start=lock._process_start(live_process.pid),
                 heartbeat_secs=30)
    assert lock.judge(alive, 1.0)[0] == lock.ALIVE
    verdict, reason = lock.judge(dict(alive, pid=dead_pid), 1.0)
    assert verdict == lock.GONE and "its pid no longer runs" in reason
    verdict, reason = lock.judge(dict(alive, process_start="1"), 1.0)  # pid reused since
    assert verdict == lock.GONE and "its pid now runs another process" in reason
    verdict, reason = lock.judge(alive, 91.0)  # alive but silent (SIGSTOP): 3 x 30 s
    assert verdict == lock.STALE and "stale after 90 s" in reason
    assert lock.judge(dict(alive, host="node-17"), 1.0)[0] == lock.ANOTHER_MACHINE
    assert lock.judge(dict(alive, pid_namespace="pid:[1]"), 1.0)[0] == lock.ANOTHER_MACHINE
    assert lock.judge(dict(alive, host="node-17"), 91.0)[0] == lock.STALE


def test_a_live_holder_is_refused_in_one_line_and_restore_and_evaluate_still_run(
        tmp_path, live_process):
    import tensorflow as tf

    from small_trainers import Unshuffled

    class Evaluated(Unshuffled):
        eval_dataset = Unshuffled.train_dataset

        def eval_step(self, batch):
            x, y = batch
            return {"loss": tf.reduce_mean(tf.square(y - self.model(x)))}

    model_dir = str(tmp_path / "run")
    Evaluated(model_dir=model_dir, progress="none").fit(train_steps=10, steps_per_loop=10)
    _foreign_claim(model_dir, live_process.pid)
    before = _snapshot(model_dir)
    trainer = Evaluated(model_dir=model_dir, progress="none")
    with pytest.raises(TapekitError) as refused:
        trainer.fit(train_steps=20, steps_per_loop=10)
    message = str(refused.value)
    assert "\n" not in message
    assert (f"model_dir {model_dir} is held by another training job (host {socket.gethostname()}, "
            f"pid {live_process.pid}, started 2026-01-01T00:00:00+00:00, last heartbeat") in message
    assert "train in another --model_dir" in message
    assert _snapshot(model_dir) == before  # nothing written
    assert trainer.restore() == 10 and "loss" in trainer.evaluate(steps=1)  # read only: allowed
    assert _claim(model_dir)["token"] == "theirs"


def test_the_python_api_holds_the_model_dir_during_each_fit_only(tmp_path):
    import tapekit

    from small_trainers import Unshuffled
    model_dir = str(tmp_path / "run")
    seen = []

    class Peek(tapekit.Callback):
        def on_loop_end(self, step, logs):
            seen.append(_claim(model_dir))

    trainer = Unshuffled(model_dir=model_dir, progress="none")
    trainer.fit(train_steps=10, steps_per_loop=10, callbacks=[Peek()])
    assert seen[-1]["pid"] == os.getpid() and _claim(model_dir) is None  # released at the end
    trainer.fit(train_steps=20, steps_per_loop=10, callbacks=[Peek()])  # a notebook's next fit
    assert seen[-1]["token"] != seen[0]["token"] and _claim(model_dir) is None

    class Fails(tapekit.Callback):
        def on_loop_end(self, step, logs):
            raise ValueError("a bug in a callback")

    with pytest.raises(Exception):
        trainer.fit(train_steps=30, steps_per_loop=10, callbacks=[Fails()])
    assert _claim(model_dir) is None  # released on an error too


def test_a_dead_holder_is_taken_over_at_once_and_said_in_one_line(tmp_path, dead_pid, caplog):
    model_dir = str(tmp_path)
    _foreign_claim(model_dir, dead_pid)
    claim = lock.Claim.take(model_dir)
    try:
        assert _claim(model_dir)["pid"] == os.getpid()
        assert (f"taking over model_dir {model_dir} from a job that is gone (its pid no longer "
                f"runs) (host {socket.gethostname()}, pid {dead_pid}, started ") in caplog.text
    finally:
        claim.release()
    assert os.listdir(model_dir) == []  # no claim, nothing moved aside left behind


def test_a_claim_from_another_host_with_an_old_heartbeat_is_taken_over(tmp_path, caplog):
    _foreign_claim(str(tmp_path), 1, heartbeat_age=600, host="node-17")
    lock.Claim.take(str(tmp_path)).release()
    assert ("from a job that stopped renewing its claim (stale after 90 s) (host node-17, pid 1, "
            "started 2026-01-01T00:00:00+00:00, last heartbeat 600 s ago)") in caplog.text


def test_a_fresh_claim_from_another_host_is_watched_then_taken_over_after_the_stated_time(
        tmp_path, caplog):
    # Its heartbeat is recent by its clock (ahead of ours): this job waits 3 heartbeats
    # (3 x 0.4 s) of its own clock for a renewal.
    _foreign_claim(str(tmp_path), 1, heartbeat_age=-30, heartbeat_secs=0.4, host="node-17")
    started = time.monotonic()
    lock.Claim.take(str(tmp_path), interval=0.4).release()
    assert 1.2 <= time.monotonic() - started < 10
    assert "waiting up to 1.2 s for it to renew its claim or go stale" in caplog.text
    assert re.search(r"from a job that stopped renewing its claim \(not renewed in the 1\.\d s "
                     r"this job watched it, stale after 1\.2 s\) \(host node-17, pid 1", caplog.text)


def test_watching_a_claim_from_another_host_is_not_cut_short(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_ATTEMPTS", 2)  # watching polls many more times than this
    _foreign_claim(str(tmp_path), 1, heartbeat_age=-30, heartbeat_secs=0.4, host="node-17")
    lock.Claim.take(str(tmp_path), interval=0.4).release()


def test_a_claim_from_another_host_that_renews_is_refused(tmp_path):
    content = _foreign_claim(str(tmp_path), 1, heartbeat_secs=0.2, host="node-17")
    renewing = threading.Event()

    def renew():
        while not renewing.is_set():
            content["heartbeat"] = lock._now()
            lock._write_beside_and_replace(os.path.join(tmp_path, lock.CLAIM_FILE),
                                           lock._encode(content))
            time.sleep(0.1)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        with pytest.raises(TapekitError, match="is held by another training job .host node-17"):
            lock.Claim.take(str(tmp_path), interval=0.2)
    finally:
        renewing.set()
        thread.join()


def test_two_takers_of_a_stale_claim_race_and_exactly_one_wins(tmp_path, dead_pid):
    for attempt in range(30):
        model_dir = str(tmp_path / str(attempt))
        _foreign_claim(model_dir, dead_pid)
        start, results = threading.Barrier(2), []

        def take():
            start.wait()
            try:
                results.append(lock.Claim.take(model_dir))
            except TapekitError as error:
                results.append(error)

        threads = [threading.Thread(target=take) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        claims = [r for r in results if isinstance(r, lock.Claim)]
        assert len(results) == 2 and len(claims) == 1, results
        assert _claim(model_dir)["token"] == claims[0].content["token"]
        claims[0].release()
        assert os.listdir(model_dir) == []


def test_without_hard_links_the_claim_is_created_exclusively_and_taken_over(
        tmp_path, dead_pid, live_process, monkeypatch, caplog):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # some FUSE mounts
    lock.Claim.take(str(tmp_path)).release()
    _foreign_claim(str(tmp_path), dead_pid)
    claim = lock.Claim.take(str(tmp_path))
    assert "from a job that is gone" in caplog.text
    with pytest.raises(TapekitError, match="is held by another training job"):
        lock.Claim.take(str(tmp_path))  # this process's own live claim
    claim.release()
    assert os.listdir(tmp_path) == []


def test_a_holder_that_lost_its_claim_exits_at_once(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    claim = lock.Claim.take(str(tmp_path), interval=0.1)
    _foreign_claim(str(tmp_path), 1, host="node-17")  # as a taker would, after its stale time
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exits == [2]
    claim.release()
    assert _claim(str(tmp_path))["token"] == "theirs"  # not removed: it is not ours


class _FakeEngine:
    def __init__(self, model_dir):
        self.model_dir, self.strategy = model_dir, object()


@pytest.mark.parametrize("chief_refused", [False, True])
def test_only_the_chief_holds_it_and_its_refusal_reaches_every_worker(
        tmp_path, monkeypatch, live_process, chief_refused):
    """The decision of each worker, with the strategy faked (a real two-worker run:
    `test_two_workers_only_the_chief_holds_the_model_dir`)."""
    from tapekit.run import distribute
    model_dir = str(tmp_path)
    if chief_refused:
        _foreign_claim(model_dir, live_process.pid)
    votes = {}
    monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy: True)
    monkeypatch.setattr(distribute, "any_worker", lambda strategy, flag: votes.setdefault(
        "chief", flag) or flag)
    monkeypatch.setattr(distribute, "is_chief", lambda strategy: True)
    with contextlib.ExitStack() as stack:
        if chief_refused:
            stack.enter_context(pytest.raises(TapekitError, match="held by another training job"))
        held = stack.enter_context(lock.held_for_training(_FakeEngine(model_dir)))
        assert held is not None and _claim(model_dir)["pid"] == os.getpid()
    assert votes == {"chief": chief_refused}
    # A non-chief worker holds nothing, and learns of the chief's refusal by the vote.
    monkeypatch.setattr(distribute, "is_chief", lambda strategy: False)
    monkeypatch.setattr(distribute, "any_worker", lambda strategy, flag: votes["chief"] or flag)
    with contextlib.ExitStack() as stack:
        if chief_refused:
            stack.enter_context(pytest.raises(TapekitError, match="the chief was refused model_dir"))
        assert stack.enter_context(lock.held_for_training(_FakeEngine(model_dir))) is None
        assert _claim(model_dir) is None


def test_an_object_store_model_dir_is_not_locked_and_says_so(caplog):
    with lock.held_for_training(type("E", (), {"model_dir": "ram://bucket/run",
                                                "strategy": None})()) as held:
        assert held is None
    assert "is on an object store, which cannot create a file only if it is absent" in caplog.text


def test_the_heartbeat_costs_the_loop_nothing(tmp_path):
    """The loop does nothing per step; a renewal (the thread's whole work each interval) is
    a read and a small atomic rewrite."""
    claim = lock.Claim.take(str(tmp_path), interval=3600)
    try:
        started = time.perf_counter()
        for _ in range(100):
            lock._write_beside_and_replace(claim.path, lock._encode(claim.content))
        per_renewal = (time.perf_counter() - started) / 100
    finally:
        claim.release()
    assert per_renewal < 0.05  # every 30 s: far below 0.1% of one core


# ---------------------------------------------------------------- real processes


def test_two_jobs_started_together_one_trains_and_the_other_is_refused_in_one_line(
        tmp_path, cli_env):
    model_dir = tmp_path / "run"
    pauses = [str(tmp_path / f"paused-{n}") for n in range(2)]
    jobs = [start_cli(RUN + [f"--model_dir={model_dir}", "--pause_at_step=20",
                             f"--pause_file={pause}"], cli_env, TESTS) for pause in pauses]
    try:
        deadline = time.monotonic() + 240
        while not any(job.poll() is not None for job in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (refused,) = [job for job in jobs if job.poll() is not None]
        (winner,) = [job for job in jobs if job is not refused]
        _, stderr = refused.communicate()
        assert refused.returncode == 2, stderr[-3000:]
        assert _errors(stderr) == [stderr.strip().splitlines()[-1]]
        print(stderr.strip().splitlines()[-1])
        assert stderr.strip().splitlines()[-1].startswith(
            f"tapekit-train: error: model_dir {model_dir} is held by another training job (host "
            f"{socket.gethostname()}, pid {winner.pid}, started ")
        assert wait_for_pause(pauses[jobs.index(winner)], winner) == 20
        assert _rows(model_dir) == [10, 20]  # the winner's rows, whole
        let_go(pauses[jobs.index(winner)])
        _, stderr = winner.communicate(timeout=240)
        assert winner.returncode == 0, stderr[-3000:]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert _rows(model_dir) == [10, 20, 30, 40]
    assert sorted(p.name for p in (model_dir / "checkpoints").glob("*.index"))[-1] == "ckpt-40.index"
    assert _claim(model_dir) is None


def test_a_second_job_touches_nothing_and_an_evaluator_runs_beside_the_training_job(
        tmp_path, cli_env):
    model_dir, pause = tmp_path / "run", str(tmp_path / "paused")
    with paused_cli(RUN + [f"--model_dir={model_dir}"], cli_env, TESTS, pause, 20) as holder:
        held = _claim(model_dir)
        assert held["pid"] == holder.pid
        before = _snapshot(model_dir)
        second = run_cli(RUN + [f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
        assert second.returncode == 2, second.stderr[-3000:]
        print(second.stderr.strip().splitlines()[-1])
        assert len(_errors(second.stderr)) == 1
        assert f"is held by another training job (host {socket.gethostname()}, pid {holder.pid}" \
            in second.stderr
        after = _snapshot(model_dir)
        after.pop(lock.CLAIM_FILE), before.pop(lock.CLAIM_FILE)  # the holder's heartbeat
        assert after == before
        evaluator = run_cli(RUN + [f"--model_dir={model_dir}", "--mode=evaluate"], cli_env,
                            cwd=TESTS)
        assert evaluator.returncode == 0, evaluator.stderr[-3000:]
        assert _rows(model_dir, "eval_metrics.jsonl") == [20]
        assert _claim(model_dir)["token"] == held["token"]  # the evaluator took nothing
        let_go(pause)
        _, stderr = holder.communicate(timeout=240)
        assert holder.returncode == 0, stderr[-3000:]
    assert _rows(model_dir) == [10, 20, 30, 40] and _claim(model_dir) is None


def test_kill_9_of_the_holder_then_an_immediate_restart_takes_over_and_resumes(tmp_path, cli_env):
    model_dir, pause = tmp_path / "run", str(tmp_path / "paused")
    with paused_cli(RUN + [f"--model_dir={model_dir}"], cli_env, TESTS, pause, 20) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert _claim(model_dir)["pid"] == holder.pid  # left behind
    restarted = run_cli(RUN + [f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    (line,) = [line for line in restarted.stderr.splitlines() if "taking over" in line]
    print(line)
    assert (f"taking over model_dir {model_dir} from a job that is gone (its pid no longer runs) "
            f"(host {socket.gethostname()}, pid {holder.pid}, started ") in line
    assert f"resumed from checkpoint {model_dir}/checkpoints/ckpt-20 at step 20" in restarted.stderr
    assert _rows(model_dir) == [10, 20, 30, 40] and _claim(model_dir) is None


def test_a_stopped_holder_is_taken_over_after_the_stated_time_and_exits_when_it_wakes(
        tmp_path, cli_env):
    env = dict(cli_env, **{lock.HEARTBEAT_ENVIRONMENT: "0.5"})  # stale after 1.5 s
    model_dir, pause = tmp_path / "run", str(tmp_path / "paused")
    with paused_cli(RUN + [f"--model_dir={model_dir}"], env, TESTS, pause, 20) as holder:
        holder.send_signal(signal.SIGSTOP)
        time.sleep(2.0)
        taker = run_cli(RUN + [f"--model_dir={model_dir}"], env, cwd=TESTS)
        assert taker.returncode == 0, taker.stderr[-3000:]
        (line,) = [line for line in taker.stderr.splitlines() if "taking over" in line]
        print(line)
        assert re.search(r"from a job that stopped renewing its claim \(stale after 1\.5 s\) "
                         rf"\(host {socket.gethostname()}, pid {holder.pid}, started .*, last "
                         r"heartbeat \d s ago\)", line), line
        finished = _snapshot(model_dir)
        holder.send_signal(signal.SIGCONT)  # it wakes, finds its claim gone, writes nothing
        _, stderr = holder.communicate(timeout=60)
        print(stderr.strip().splitlines()[-1])
        assert holder.returncode == 2, stderr[-3000:]
        assert f"the claim on model_dir {model_dir} is no longer this job's" in stderr
        assert "exiting at once, writing nothing more" in stderr
        assert _snapshot(model_dir) == finished
    assert _rows(model_dir) == [10, 20, 30, 40]


def test_two_workers_only_the_chief_holds_the_model_dir(tmp_path, cli_env):
    from test_multi_worker import _finish, _launch
    model_dir = tmp_path / "run"
    pauses = [str(tmp_path / f"paused-{n}") for n in range(2)]
    workers = _launch(tmp_path, cli_env, [
        "--train_steps=40", "--steps_per_loop=10", "--checkpoint_every_steps=10",
        f"--model_dir={model_dir}"], worker_flags={
            n: ["--pause_at_step=20", f"--pause_file={pauses[n]}"] for n in range(2)})
    try:
        for worker, pause in zip(workers, pauses):
            assert wait_for_pause(pause, worker, timeout=240) == 20
        held = _claim(model_dir)
        assert held["pid"] == workers[0].pid  # the chief's; worker 1 holds nothing
        assert [name for name in os.listdir(model_dir) if "claim" in name] == [lock.CLAIM_FILE]
        second = run_cli(RUN + [f"--model_dir={model_dir}", "--strategy=default",
                                "--global_batch_size=100"], cli_env, cwd=TESTS)
        assert second.returncode == 2 and f"pid {workers[0].pid}" in second.stderr, second.stderr
        for pause in pauses:
            let_go(pause)
        _finish(workers)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert _rows(model_dir) == [10, 20, 30, 40] and _claim(model_dir) is None

