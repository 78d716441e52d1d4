"""TensorFlow Recommenders on the same two-tower model and the same training rows, for bench/throughput.py.

Runs in its own virtual environment (TensorFlow never enters twotower's):

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tensorflow-recommenders pandas pyarrow
    /tmp/tfvenv/bin/python bench/tfrs_baseline.py --data train.parquet --out tfrs.json --epochs 5

``--data`` is written by bench/throughput.py: one row per training interaction with ``user_idx``,
``item_idx`` and ``log_q`` (log of the item's sampling probability, the logQ correction twotower uses),
and its metadata (``num_users``, ``num_items``, ``dim``, ``temperature``, ``lr``, ``batch_size``).
The model mirrors ``configs/ml100k.yaml``: an id embedding of ``dim`` per side (normal init, std .05),
L2-normalised (cosine), logits / temperature, logQ-corrected in-batch softmax with accidental hits
removed (``tfrs.tasks.Retrieval``), Adam (= AdamW at weight decay 0, as the config has). The input
pipeline is cached in memory, shuffled every epoch and prefetched, as in the TFRS tutorials. Writes
per-epoch examples/s (the first epoch includes tracing), the mean loss per row and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS 0.7 is written against Keras 2 (tf_keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pyarrow.parquet as pq  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402


class TwoTower(tfrs.Model):
    def __init__(self, num_users: int, num_items: int, dim: int, temperature: float) -> None:
        super().__init__()
        init = tf.keras.initializers.RandomNormal(stddev=0.05, seed=0)
        self.user = tf.keras.layers.Embedding(num_users, dim, embeddings_initializer=init)
        self.item = tf.keras.layers.Embedding(num_items, dim, embeddings_initializer=init)
        self.task = tfrs.tasks.Retrieval(temperature=temperature, remove_accidental_hits=True)

    def compute_loss(self, features, training=False):
        query = tf.math.l2_normalize(self.user(features["user_idx"]), axis=-1)
        candidate = tf.math.l2_normalize(self.item(features["item_idx"]), axis=-1)
        return self.task(
            query,
            candidate,
            candidate_sampling_probability=tf.exp(features["log_q"]),
            candidate_ids=features["item_idx"],
            compute_metrics=False,
            compute_batch_metrics=False,
        )


class EpochTimer(tf.keras.callbacks.Callback):
    """Seconds per epoch, and the epoch's mean loss per row.

    TFRS's Retrieval loss is a SUM over the batch's rows, and Keras's epoch logs hold the LAST batch's
    value (a partial batch here), so the per-row mean is accumulated from the batch logs instead.
    """

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows

    def on_train_begin(self, logs=None):
        self.seconds, self.losses = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._loss_sum = time.perf_counter(), 0.0

    def on_train_batch_end(self, batch, logs=None):
        self._loss_sum += float(logs["loss"])

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.losses.append(self._loss_sum / self.rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    args = parser.parse_args()

    table = pq.read_table(args.data)
    meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    columns = {
        "user_idx": table.column("user_idx").to_numpy(),
        "item_idx": table.column("item_idx").to_numpy(),
        "log_q": table.column("log_q").to_numpy().astype("float32"),
    }
    n, batch = len(columns["user_idx"]), int(meta["batch_size"])
    tf.keras.utils.set_random_seed(0)
    data = (
        tf.data.Dataset.from_tensor_slices(columns)
        .cache()
        .shuffle(n, seed=0, reshuffle_each_iteration=True)
        .batch(batch)
        .prefetch(tf.data.AUTOTUNE)
    )
    model = TwoTower(
        int(meta["num_users"]), int(meta["num_items"]), int(meta["dim"]), float(meta["temperature"])
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=float(meta["lr"])), jit_compile=args.jit)
    timer = EpochTimer(n)
    model.fit(data, epochs=args.epochs, verbose=0, callbacks=[timer])
    result = {
        "examples_per_s": [n / s for s in timer.seconds],
        "seconds": timer.seconds,
        "loss": timer.losses,
        "rows": n,
        "batch_size": batch,
        "jit_compile": args.jit,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"tensorflow": tf.__version__, "tensorflow_recommenders": tfrs.__version__},
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
