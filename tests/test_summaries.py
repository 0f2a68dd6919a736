"""`tapekit.summaries`: TensorBoard records written with TensorFlow alone."""

import glob

import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

from tapekit import summaries


def read_events(logdir):
    values = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                values[(value.tag, event.step)] = value
    return values


def test_scalars_images_and_histograms_are_written_with_their_plugins(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default(step=7):
        summaries.scalar("loss", 0.25, 7)
        summaries.image("samples", np.zeros([4, 6, 3], np.uint8), 7)
        summaries.histogram("generated", np.array([0.0, 1.0, 1.0, np.nan]), 7, buckets=2)
        summaries.histogram("empty", np.array([np.inf]), 7)  # nothing finite: not written
    writer.flush()
    events = read_events(tmp_path)
    assert set(events) == {("loss", 7), ("samples", 7), ("generated", 7)}
    loss = events[("loss", 7)]
    assert loss.metadata.plugin_data.plugin_name == "scalars"
    assert tf.make_ndarray(loss.tensor) == np.float32(0.25)
    width, height, png = tf.make_ndarray(events[("samples", 7)].tensor)
    assert (width, height) == (b"6", b"4") and png.startswith(b"\x89PNG")
    histogram = tf.make_ndarray(events[("generated", 7)].tensor)
    assert histogram.tolist() == [[0.0, 0.5, 1.0], [0.5, 1.0, 2.0]]
