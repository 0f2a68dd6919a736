"""Writes each loop's and evaluation's metrics as rows of MODEL_DIR/metrics.csv."""

import csv
import io
import os
from typing import Dict, List

from absl import logging

from tapekit.callbacks.base import Callback, Logs
from tapekit.callbacks.loggers import numbers
from tapekit.checkpoint import files

FIXED = ("split", "step")


class CsvLogger(Callback):
    """One row per loop (split "train"), per evaluation ("eval"), per loop's time and memory
    ("stats", from `on_loop_stats`) and per analysed profile ("profile"), to `path`.

    Columns: split, step, then each metric in the order first seen; a row leaves the
    columns it lacks empty. A metric seen for the first time rewrites the file whole with
    the wider header (as Lightning's CSVLogger does), so that the first line always names
    every column; otherwise a row is appended, so a killed job leaves every finished loop's
    row. A resumed run drops the rows after the step it resumes from, as `MetricsFile`
    does. Paths with a scheme (gs://, ram://) go through `tapekit.checkpoint.files`.
    Only the chief writes it.
    """

    def __init__(self, path: str):
        self.path = path
        self.columns: List[str] = list(FIXED)

    def on_train_begin(self, step):
        """Reads the columns of a file already there, without the rows after `step` (the
        loops a resumed run trains again)."""
        header, rows = self._read()
        if header is None:
            self.columns = list(FIXED)
            return
        self.columns = header
        kept = [row for row in rows if not _after(row, step)]
        if len(kept) < len(rows):
            self._write_all(kept)
            logging.info("metrics.csv: %d row(s) after step %d, where this run resumes, were "
                         "dropped (those loops are trained again)", len(rows) - len(kept), step)

    def on_loop_end(self, step, logs):
        self._add("train", step, logs)

    def on_eval_end(self, step, logs):
        self._add("eval", step, logs)

    def on_loop_stats(self, step, stats):
        self._add("stats", step, stats)

    def on_profile(self, step, analysis):
        self._add("profile", step, numbers(analysis))

    def _add(self, split: str, step: int, logs: Logs) -> None:
        row = {"split": split, "step": str(int(step))}
        row.update({name: _cell(value) for name, value in logs.items() if name not in FIXED})
        new = [name for name in row if name not in self.columns]
        files.makedirs(os.path.dirname(self.path) or ".")
        if new or not files.exists(self.path):
            _, rows = self._read()
            self.columns += new
            self._write_all(rows + [row])
        else:
            files.append_line(self.path, _line(self.columns, row))

    def _read(self):
        """(header, rows as dicts of text), or (None, []) without a file."""
        text = files.read_text(self.path)
        if not text:
            return None, []
        lines = list(csv.reader(io.StringIO(text)))
        if not lines:
            return None, []
        header = lines[0]
        return header, [dict(zip(header, line)) for line in lines[1:] if line]

    def _write_all(self, rows: List[Dict[str, str]]) -> None:
        text = _line(self.columns, dict(zip(self.columns, self.columns))) + "\n"
        text += "".join(_line(self.columns, row) + "\n" for row in rows)
        files.write_text_atomically(self.path, text)


def _cell(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # a NumPy or TensorFlow scalar
        except (TypeError, ValueError):
            return str(value)
    return str(value) if isinstance(value, int) else repr(float(value))


def _line(columns: List[str], row: Dict[str, str]) -> str:
    stream = io.StringIO()
    csv.writer(stream, lineterminator="").writerow([row.get(name, "") for name in columns])
    return stream.getvalue()


def _after(row: Dict[str, str], step: int) -> bool:
    try:
        return int(row.get("step", "")) > step
    except ValueError:  # a torn last line: kept as it is
        return False
