"""Examples in TFRecord files of `tf.train.Example`, and `tapekit-data`, which writes them.

Each example holds float features (e.g. `x`, and `y` for regression), stored flat as a
`float_list`, and for each a `NAME_shape` `int64_list` giving its shape (e.g. [28, 28, 1]).
`tapekit-data npz-to-tfrecord --input=F.npz --output_pattern=DIR/part --num_shards=N`
writes DIR/part-00000-of-0000N.tfrecord, ...: example i goes to shard i mod N.

Reading (`dataset`) shards by file per worker (`tapekit.input.data.shard_files`), so each worker
reads only its files. `feature_shapes` reads the first example of every file first, so
that a file that is not a TFRecord of `tf.train.Example`, a missing feature or a shape that
differs between files is one clear error before training.
"""

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tapekit.errors import TapekitError
from tapekit.input import data as data_lib


def find(pattern: str) -> List[str]:
    """The files matching a glob `pattern`, sorted; an error if there are none."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise TapekitError(f"--data={pattern!r} matches no file; give a glob of TFRecord files "
                           "(e.g. DIR/part-*.tfrecord) or an .npz file.")
    return files


def feature_shapes(files: Sequence[str], names: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """The shape of each feature in `names`, from the first example of every file."""
    found: Optional[Dict[str, Tuple[int, ...]]] = None
    for path in files:
        try:
            record = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
            if record is None:
                raise TapekitError(f"--data: {path} holds no example; remove it or write it again.")
            example = tf.train.Example.FromString(record.numpy())
        except (tf.errors.OpError, ValueError) as error:  # not a TFRecord, or not an Example
            raise TapekitError(f"--data: {path} is not a TFRecord file of tf.train.Example "
                               f"({type(error).__name__}); write it with tapekit-data "
                               "npz-to-tfrecord.") from None
        features = example.features.feature
        shapes = {}
        for name in names:
            if name not in features:
                raise TapekitError(f"--data: {path} has no feature {name!r} (it has: "
                                   f"{', '.join(sorted(features))}).")
            size = len(features[name].float_list.value)
            shape_key = f"{name}_shape"
            shape = (tuple(features[shape_key].int64_list.value) if shape_key in features
                     else (size,))
            if int(np.prod(shape)) != size:
                raise TapekitError(f"--data: {path}: feature {name!r} holds {size} values, not "
                                   f"the {shape} its {shape_key} says.")
            shapes[name] = shape
        if found is not None and shapes != found:
            raise TapekitError(f"--data: {path} has feature shapes {shapes}, but {files[0]} has "
                               f"{found}; all files must hold examples of one shape.")
        found = shapes
    return found


def dataset(files: Sequence[str], shapes: Dict[str, Tuple[int, ...]],
            input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """This worker's examples (a dict of float32 tensors of `shapes`), from its share of
    `files` (sharded by file), read in an order fixed by the file order."""
    spec = {name: tf.io.FixedLenFeature([int(np.prod(shape))], tf.float32)
            for name, shape in shapes.items()}

    def parse(record):
        parsed = tf.io.parse_single_example(record, spec)
        return {name: tf.reshape(parsed[name], shapes[name]) for name in shapes}

    return (data_lib.shard_files(list(files), input_context)
            .interleave(tf.data.TFRecordDataset, cycle_length=1)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))


def write_shards(arrays: Dict[str, np.ndarray], output_pattern: str, num_shards: int) -> List[str]:
    """Writes `arrays` (same length) as `num_shards` TFRecord files; returns their paths."""
    lengths = {len(value) for value in arrays.values()}
    if len(lengths) != 1:
        raise TapekitError(f"the arrays have different lengths: "
                           f"{ {name: len(value) for name, value in arrays.items()} }.")
    (count,) = lengths
    if num_shards < 1 or num_shards > count:
        raise TapekitError(f"num_shards must be between 1 and the {count} examples, got {num_shards}.")
    directory = os.path.dirname(output_pattern)
    if directory:
        os.makedirs(directory, exist_ok=True)
    paths = [f"{output_pattern}-{index:05d}-of-{num_shards:05d}.tfrecord"
             for index in range(num_shards)]
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    try:
        for index in range(count):
            features = {}
            for name, values in arrays.items():
                value = np.asarray(values[index], np.float32)
                features[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value.ravel()))
                features[f"{name}_shape"] = tf.train.Feature(
                    int64_list=tf.train.Int64List(value=list(value.shape)))
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writers[index % num_shards].write(example.SerializeToString())
    finally:
        for writer in writers:
            writer.close()
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`tapekit-data npz-to-tfrecord --input=F.npz --output_pattern=DIR/part --num_shards=N`."""
    from absl import flags
    flag_values = flags.FlagValues()
    flags.DEFINE_string("input", None, "An .npz file of equally long arrays (e.g. x, y).",
                        flag_values=flag_values)
    flags.DEFINE_string("output_pattern", None, "Shards are written to "
                        "OUTPUT_PATTERN-00000-of-0000N.tfrecord, ...", flag_values=flag_values)
    flags.DEFINE_integer("num_shards", 1, "How many files (at least one per worker that "
                         "will read them).", lower_bound=1, flag_values=flag_values)
    argv = list(sys.argv if argv is None else argv)
    try:
        rest = flag_values(argv)
    except flags.Error as error:
        _fail(str(error))
    if rest[1:] != ["npz-to-tfrecord"]:
        _fail("usage: tapekit-data npz-to-tfrecord --input=F.npz --output_pattern=DIR/part "
              "--num_shards=N")
    if not flag_values.input or not flag_values.output_pattern:
        _fail("--input and --output_pattern are required.")
    try:
        with np.load(flag_values.input) as loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError) as error:
        _fail(f"--input={flag_values.input!r} is not a readable .npz file ({error}).")
    try:
        paths = write_shards(arrays, flag_values.output_pattern, flag_values.num_shards)
    except TapekitError as error:
        _fail(str(error))
    print(f"wrote {len(next(iter(arrays.values())))} examples ({', '.join(sorted(arrays))}) to "
          f"{len(paths)} file(s): {paths[0]} ...", flush=True)


def _fail(message: str) -> None:
    print(f"tapekit-data: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
