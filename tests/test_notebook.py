"""`fit()` in a real Jupyter kernel, driven by nbclient as a notebook frontend would drive it.

One kernel runs the cells one by one: the default progress ("auto") is a bar redrawn in
place in the cell's output; a second `fit` continues; the Interrupt button (SIGINT to the
kernel) stops a long `fit` at a step with a checkpoint saved, and the next cell continues.
"""

import ast
import asyncio
import io
import json
import os
import re
import sys
import time
import types

import pytest

from tapekit.run import controller

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 (nbclient's own dependency)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

SETUP = '''
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf
import tapekit


class Line(tapekit.Trainer):
    default_global_batch_size = 8

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.SGD(0.05)

    def train_arrays(self):
        points = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
        return points, points @ np.array([[1.0], [-2.0], [0.5]], np.float32)

    def train_step(self, batch):
        points, targets = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(points) - targets)[:, 0])
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def eval_dataset(self, input_context):
        return tf.data.Dataset.from_tensor_slices(self.train_arrays()).batch(16)

    def eval_step(self, batch):
        points, targets = batch
        return {"loss": self.compute_mean(tf.square(self.model(points) - targets)[:, 0])}


class Handshake(tapekit.Callback):
    """Writes `path` after `loops` loops: the test presses Interrupt only then."""

    def __init__(self, path, loops):
        self.path, self.loops = pathlib.Path(path), loops

    def on_loop_end(self, step, logs):
        self.loops -= 1
        if self.loops == 0:
            self.path.write_text(str(step))


trainer = Line(model_dir=MODEL_DIR, seed=0)
os.getpid()
'''

STEPS = "[row['step'] for row in history]"
CELLS = [
    SETUP,
    f"history = trainer.fit(train_steps=20, steps_per_loop=5)\n{STEPS}",
    f"history = trainer.fit(train_steps=40, steps_per_loop=5, eval_every_steps=10)\n{STEPS}",
    "trainer.fit(train_steps=10**9, steps_per_loop=5, callbacks=[Handshake(HANDSHAKE, 3)])",
    ("restored = Line(model_dir=MODEL_DIR).restore()\n"
     f"history = trainer.fit(train_steps=restored + 10, steps_per_loop=5)\n(restored, {STEPS})"),
]


def _python_kernel(directory) -> AsyncKernelManager:
    """A kernel of this interpreter (the one with tapekit), whatever kernels are installed."""
    spec = directory / "tapekit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tapekit test", "language": "python"}))
    return AsyncKernelManager(kernel_name="tapekit-test",
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(directory)]))


def _stream(cell, name: str) -> str:
    return "".join(out["text"] for out in cell.outputs
                   if out["output_type"] == "stream" and out["name"] == name)


def _result(cell):
    (result,) = [out for out in cell.outputs if out["output_type"] == "execute_result"]
    return ast.literal_eval(result["data"]["text/plain"])


def _shown(cell) -> list:
    """The lines of the cell's stdout as a notebook shows them: each backspace and carriage
    return draws over what came before (stderr, where absl writes, is a stream of its own)."""
    text, before = _stream(cell, "stdout"), None
    while text != before:
        text, before = re.sub(r"[^\n]\x08", "", text), text
    return [re.sub(r"\x1b\[[0-9;]*m", "", line.rsplit("\r", 1)[-1]) for line in text.split("\n")]


def _redrawn_bar(cell) -> str:
    """The one line of a fit without evaluations: the bar, drawn at the start and redrawn in
    place (a carriage return, no new line) after loops, at most 20 times a second."""
    text = _stream(cell, "stdout")
    assert text.endswith("\n") and text.count("\n") == 1 and text.count("\r") >= 2, repr(text)
    return _shown(cell)[0]


async def _run(client, tmp_path, handshake) -> None:
    async with client.async_setup_kernel(cwd=str(tmp_path), cleanup_kc=True):  # shut down after
        cells = client.nb.cells
        for index in range(3):
            await client.async_execute_cell(cells[index], index)
        assert _result(cells[1]) == [5, 10, 15, 20]
        assert "20/20" in _redrawn_bar(cells[1])
        assert _result(cells[2]) == [25, 30, 35, 40]  # continued from step 20
        bar_30, eval_30, bar_40, eval_40, end = _shown(cells[2])  # each evaluation below the bar
        assert "30/40" in bar_30 and "40/40" in bar_40 and not end, _shown(cells[2])
        assert eval_30.startswith("eval at step 30: ") and eval_40.startswith("eval at step 40: ")

        running = asyncio.ensure_future(client.async_execute_cell(cells[3], 3))
        deadline = time.monotonic() + 120
        while not handshake.exists():
            assert not running.done() and time.monotonic() < deadline, cells[3].outputs
            await asyncio.sleep(0.05)
        await client.km.interrupt_kernel()  # the Interrupt button: SIGINT to the kernel
        await asyncio.wait_for(running, 120)
        await client.async_execute_cell(cells[4], 4)


def test_fit_in_a_notebook_shows_a_bar_continues_and_stops_on_interrupt(tmp_path):
    handshake = tmp_path / "handshake"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(
        f"MODEL_DIR, HANDSHAKE = {str(tmp_path / 'run')!r}, {str(handshake)!r}\n" + CELLS[0])]
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in CELLS[1:]]
    client = nbclient.NotebookClient(notebook, km=_python_kernel(tmp_path / "kernels"),
                                     timeout=180, allow_errors=True, shutdown_kernel="immediate")
    asyncio.run(_run(client, tmp_path, handshake))

    (error,) = [out for out in notebook.cells[3].outputs if out["output_type"] == "error"]
    assert error["ename"] == "KeyboardInterrupt", error
    stopped = int(re.fullmatch(r"interrupted at step (\d+)", error["evalue"]).group(1))
    assert 55 <= int(handshake.read_text()) <= stopped < 10**9  # 3 loops after step 40
    assert f"interrupted at step {stopped}, checkpoint" in _stream(notebook.cells[3], "stderr")
    assert f"{stopped}/1000000000" in _redrawn_bar(notebook.cells[3])
    # the checkpoint holds the step reached, and the same trainer goes on from there
    assert _result(notebook.cells[4]) == (stopped, [stopped + 5, stopped + 10])
    with pytest.raises(ProcessLookupError):  # the kernel is gone
        os.kill(_result(notebook.cells[0]), 0)


def test_auto_progress_is_one_log_line_per_loop_in_a_batch_job_that_imported_ipykernel(
        monkeypatch):
    pytest.importorskip("ipykernel.zmqshell")  # loaded, but no kernel runs this process
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a batch job's log: not a terminal
    options = types.SimpleNamespace(progress="auto", sample_every_steps=None)
    found = controller.default_callbacks(None, options, 100, None)
    assert [type(callback).__name__ for callback in found] == ["LogProgress"]
