"""How examples become distributed batches, and where a run is in them.

`data` (`per_replica_batches`: one pipeline split the same way on any strategy), `run_input`
(a trainer's input as the loop reads it, and the position a resumed run picks up),
`epochs` (passes over data that ends, resumable mid-pass) and `tfrecords` (files of
`tf.train.Example`, and `tapekit-data`). Eager, between loops.
"""
