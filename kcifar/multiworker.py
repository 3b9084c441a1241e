"""Training on several machines: ``tf.distribute.MultiWorkerMirroredStrategy`` under ``model.fit``.

Every worker runs the same command; ``TF_CONFIG`` gives it the cluster's addresses and
its own index. TensorFlow all-reduces the gradients of each step, so every worker keeps
the same weights, and one global batch of ``train.batch_size`` images is split among the
workers. The chief (worker 0, or the task named ``chief``) alone writes the run
directory; every other worker trains in a temporary copy of it, removed when it ends, as
TensorFlow's multi-worker guide advises: saving reads synchronised variables, so all
workers save alike, and all but the chief into a temporary folder.

Keras 3 fails ``model.fit`` under this strategy (keras-team/keras#20585, still open;
tensorflow/tensorflow#72388), in two places of ``keras/src/backend/tensorflow/trainer.py``
(Keras 3.15.1, TensorFlow 2.21); ``fix_keras`` mends both, in a worker's process only:

- ``TensorFlowTrainer._maybe_symbolic_build`` (line 731) all-reduces the first batch, a
  tuple of PerReplica values, with ``strategy.reduce``, which takes one value: "Attempt to
  convert a value (PerReplica ...) to a Tensor". The symbolic build needs the batch's
  shapes only: the worker's own part of it serves.
- ``reduce_per_replica`` (line 841) averages each step's scalar logs over the replicas
  with ``strategy.reduce("MEAN", v, axis=0)``: "Invalid reduction dimension 0 for input
  with 0 dimensions". The mean of a scalar over the replicas needs ``axis=None``.
"""

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import tensorflow as tf
from keras import tree

from kcifar import rundir
from kcifar.errors import KcifarError

_STRATEGY = []  # the process's one MultiWorkerMirroredStrategy (TensorFlow allows one)


def make_strategy():
    """MultiWorkerMirroredStrategy over the cluster of ``TF_CONFIG`` (checked first); waits
    until every worker has started."""
    if not _STRATEGY:
        check_tf_config(os.environ.get("TF_CONFIG"))
        fix_keras()
        _STRATEGY.append(tf.distribute.MultiWorkerMirroredStrategy())
    return _STRATEGY[0]


def check_tf_config(text):
    """``TF_CONFIG`` must name the cluster's workers and this process's task."""
    if not text:
        raise KcifarError("strategy 'multiworker' reads the cluster from TF_CONFIG, which is not set; set it on "
                          "every worker (docs/MULTIWORKER.md)")
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        kind, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError):
        raise KcifarError('TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
                          '"task": {"type": "worker", "index": 0}}') from None
    if kind not in config["cluster"] or not 0 <= index < len(config["cluster"][kind]) or not workers:
        raise KcifarError(f"TF_CONFIG's task {kind} {index} is not in its cluster {config['cluster']}")


def local_tf_configs(workers: int) -> list[str]:
    """One ``TF_CONFIG`` per worker of a cluster on this machine (free 127.0.0.1 ports), to
    try several workers without several machines. A port is free when asked for; another
    program could take it before the workers start."""
    sockets = [socket.socket() for _ in range(workers)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
    return [json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
            for index in range(workers)]


def fix_keras():
    """Mend Keras' two multi-worker failures (this module's docstring); once per process."""
    from keras.src.backend.tensorflow import trainer as keras_trainer  # private: imported only to mend it

    if getattr(keras_trainer.reduce_per_replica, "kcifar_fix", False):
        return
    build, reduce = keras_trainer.TensorFlowTrainer._maybe_symbolic_build, keras_trainer.reduce_per_replica

    def build_from_local_batch(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:  # the first batch, this worker's part
                data_batch = tree.map_structure(lambda v: _local(v, self.distribute_strategy), next(batches))
                break
        return build(self, data_batch=data_batch)

    def reduce_scalars_over_replicas(values, strategy, reduction):
        if reduction in ("auto", "mean") and keras_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None) if v.shape.rank == 0
                                      else reduce(v, strategy, reduction), values)
        return reduce(values, strategy, reduction)

    reduce_scalars_over_replicas.kcifar_fix = True
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = build_from_local_batch
    keras_trainer.reduce_per_replica = reduce_scalars_over_replicas


def _local(value, strategy):
    return strategy.experimental_local_results(value)[0] if isinstance(value, tf.distribute.DistributedValues) else value


def is_chief(strategy) -> bool:
    """Whether this process writes the run directory: TensorFlow's ``should_checkpoint``
    (true for every strategy of one process)."""
    return strategy.extended.should_checkpoint


def worker_copy(run_dir: Path, overwrite: bool) -> Path:
    """A non-chief worker's run directory: a temporary copy of the chief's ``run_dir``
    (nothing with ``overwrite``), so it resumes where the chief does; removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="kcifar-worker-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    copy = folder / run_dir.name
    if run_dir.is_dir() and not overwrite:  # the chief's files are renamed into place: skip its ".x" temporaries
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".*", "*.png", rundir.TENSORBOARD))
    return copy


def check_same_on_every_worker(strategy, epoch: int):
    """Refuse workers that would resume at different epochs (one did not see the chief's run)."""
    if strategy.num_replicas_in_sync == 1 or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    epochs = strategy.gather(tf.constant([epoch]), axis=0).numpy().tolist()
    if len(set(epochs)) > 1:
        raise KcifarError(f"the workers would resume at different epochs {epochs}: every worker must see the "
                          "chief's run directory (one --runs-dir shared by all machines), or pass --overwrite "
                          "to every worker to start again")


@contextlib.contextmanager
def lost_workers_are_errors():
    """A worker that stopped (killed, crashed, unreachable) ends the others with one line."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as error:
        tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message)))
        which = ", ".join(tasks) or error.message.strip().splitlines()[0][:200]
        raise KcifarError(f"a worker of the cluster stopped ({which}); start every worker again with the same "
                          "command to resume at the last finished epoch") from None
