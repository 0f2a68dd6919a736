"""Choosing a `tf.distribute.Strategy` by name: the only place tapekit touches devices.

tapekit has no distribution machinery of its own: every name maps to TensorFlow's
strategy, and several machines go through `MultiWorkerMirroredStrategy` + `TF_CONFIG`.
"""

import contextlib
import json
import os
import re
from typing import Optional, Union

import tensorflow as tf

from tapekit.errors import TapekitError
from tapekit.options import STRATEGY_NAMES

# Mirrored strategies over the same devices share TensorFlow's collective keys: a second one
# in the same process collides with the first ("Shape mismatch in the collective instance").
# So each device set gets one strategy per process, reused by every trainer.
_MIRRORED: dict = {}


def _mirrored(devices=None) -> tf.distribute.MirroredStrategy:
    key = tuple(devices) if devices else None
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(list(key) if key else None)
    return _MIRRORED[key]


def split_cpu(num_replicas: int) -> None:
    """Splits the host CPU into `num_replicas` logical devices (/cpu:0 … /cpu:N-1).

    Must run before TensorFlow initialises its devices (before any op runs). Used by
    tests and by CPU-only multi-replica runs (`--cpu_replicas`).
    """
    if num_replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * num_replicas
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_replicas:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:
        raise TapekitError(
            f"cannot split the CPU into {num_replicas} replicas: TensorFlow's devices are "
            f"already initialised ({error}); set cpu_replicas before any TensorFlow op runs."
        ) from None


def resolve_strategy(
    strategy: Union[str, tf.distribute.Strategy, None] = "default",
    device: Optional[str] = None,
    cpu_replicas: int = 1,
    cluster_resolver: str = "tf_config",
    slurm_port_base: int = 8888,
) -> tf.distribute.Strategy:
    """Returns the `tf.distribute.Strategy` named by `strategy` (or `strategy` itself).

    Runs eagerly, once per trainer. Names:
      default       TensorFlow's default strategy (one device, no wrapping cost).
      auto          Mirrored over all GPUs when there are several, OneDevice on a single
                    GPU, and otherwise default (or Mirrored over `cpu_replicas` CPUs).
      one_device    OneDeviceStrategy on `device` (e.g. "/gpu:0"; default "/cpu:0").
      mirrored      MirroredStrategy over all local GPUs, or over `cpu_replicas` CPUs.
      multi_worker  MultiWorkerMirroredStrategy, cluster read from TF_CONFIG, or with
                    `cluster_resolver="slurm"` from the Slurm step (`slurm_resolver`).
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    name = strategy or "default"
    if name not in STRATEGY_NAMES:
        raise TapekitError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}.")
    if cpu_replicas < 1:
        raise TapekitError(f"cpu_replicas must be at least 1, got {cpu_replicas}.")
    if name == "multi_worker":
        resolver = slurm_resolver(slurm_port_base) if cluster_resolver == "slurm" else None
        if resolver is None:
            _check_tf_config()
        split_cpu(cpu_replicas)
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    split_cpu(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "auto":
        if len(gpus) > 1:
            return _mirrored()
        if len(gpus) == 1:
            return tf.distribute.OneDeviceStrategy(gpus[0].name)
        name = "mirrored" if cpu_replicas > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(_existing_device(device or "/cpu:0"))
    # mirrored
    if gpus:
        return _mirrored()
    return _mirrored(cpus[:cpu_replicas])


def slurm_resolver(port_base: int):
    """TensorFlow's `SlurmClusterResolver` for the Slurm step this process runs in: one
    worker per task (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST,
    SLURM_STEP_TASKS_PER_NODE), task k of a node on port `port_base + k`. GPUs are left as
    Slurm made them visible (e.g. `--gpus-per-task`): each task uses the GPUs it sees."""
    resolvers = tf.distribute.cluster_resolver
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = None if visible else len(tf.config.list_physical_devices("GPU"))
    try:
        if gpus != 0:
            return resolvers.SlurmClusterResolver(port_base=port_base, gpus_per_node=gpus,
                                                  auto_set_gpu=False)
        # No GPU: the resolver divides by GPUs per task (range step 0), so let it allocate
        # placeholders it never applies (auto_set_gpu=False) and keep only the cluster.
        slurm = resolvers.SlurmClusterResolver(port_base=port_base, gpus_per_node=1 << 16,
                                               gpus_per_task=1, auto_set_gpu=False)
        cluster = slurm.cluster_spec()
        return resolvers.SimpleClusterResolver(cluster, task_type=slurm.task_type,
                                               task_id=slurm.task_id, num_accelerators={},
                                               rpc_layer="grpc")
    except (RuntimeError, KeyError, ValueError) as error:
        raise TapekitError(
            f"--cluster_resolver=slurm cannot read the Slurm step ({error}); run each task "
            "with srun inside a Slurm allocation, or use TF_CONFIG (see docs/running.md, Slurm).") from None


def _existing_device(device: str) -> str:
    try:
        spec = tf.DeviceSpec.from_string(device)
    except ValueError:
        spec = None
    if spec is None or spec.device_type is None:
        raise TapekitError(f"cannot parse device {device!r}; write it like '/gpu:0' or '/cpu:0'.")
    kind = spec.device_type.upper()
    index = spec.device_index or 0
    names = [d.name for d in tf.config.list_logical_devices(kind)]
    if index >= len(names):
        available = ", ".join(d.name for d in tf.config.list_logical_devices()) or "none"
        raise TapekitError(
            f"device {device!r} does not exist on this machine; available: {available}.")
    return names[index]


def _check_tf_config() -> None:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise TapekitError(
            "strategy 'multi_worker' needs the TF_CONFIG environment variable "
            "(cluster and task); see docs/running.md, 'Several machines'.")
    try:
        config = json.loads(raw)
        cluster = config["cluster"]
        task = config["task"]
        members = cluster[task["type"]]
        if not 0 <= int(task["index"]) < len(members):
            raise IndexError(task["index"])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise TapekitError(
            f"TF_CONFIG is not usable for 'multi_worker' ({type(error).__name__}: {error}); it "
            "must be JSON with 'cluster' (e.g. {\"worker\": [\"host:port\", …]}) and 'task' "
            "({\"type\": \"worker\", \"index\": i}); see docs/running.md, 'Several machines'."
        ) from None


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the task that writes checkpoints, summaries and metrics (TensorFlow's rule:
    the 'chief' task, or worker 0 when the cluster has no chief)."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    return bool(resolver is not None and resolver.cluster_spec().as_dict())


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker (and chief) tasks train: 1 unless multi-worker."""
    if not is_multi_worker(strategy):
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def stopped_workers(error: BaseException, strategy: Optional[tf.distribute.Strategy] = None
                    ) -> Optional[str]:
    """'worker 1' (or 'chief 0, worker 2') when `error` is TensorFlow's report that other
    tasks of a multi-worker job stopped sending heartbeats (a collective aborted), else None.
    The task running `strategy` is never named (TensorFlow 2.16 lists it with the others)."""
    text = str(error)
    if "unhealthy" not in text and "Collective ops is aborted" not in text:
        return None
    resolver = getattr(strategy, "cluster_resolver", None)
    this_task = ((resolver.task_type, str(resolver.task_id or 0))
                 if resolver is not None and resolver.task_type else None)
    tasks = sorted(set(re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)",
                                  text.split("unhealthy", 1)[-1])) - {this_task})
    return ", ".join(f"{job} {task}" for job, task in tasks) or "another worker"


@contextlib.contextmanager
def peers_stopping_explained(runner):
    """Turns TensorFlow's error for workers that stopped sending heartbeats, raised while
    `runner` (the engine) trains, into one line naming them, the step this worker reached
    and the checkpoint to resume from. Other errors pass through."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.InternalError) as error:
        stopped = stopped_workers(error, runner.strategy)
        if stopped is None:
            raise
        raise TapekitError(
            f"{stopped} stopped (no more heartbeats) while this worker was at step "
            f"{runner.current_step}; the last checkpoint is "
            f"{runner.latest_checkpoint or 'none (none was saved)'}. "
            "Restart all workers to resume from it.") from None


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True if `flag` is True on any worker (a collective only when multi-worker).

    Used at loop ends so that a SIGTERM sent to one worker stops all of them at the same
    step, where every worker then takes part in saving the checkpoint.
    """
    if not is_multi_worker(strategy):
        return bool(flag)
    votes = strategy.run(lambda: tf.constant(float(flag)))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0
