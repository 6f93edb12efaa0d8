"""The TensorFlow tutorial's own `train_step` ("Image captioning with visual attention"), timed on this CPU.

Run with a Python that has TensorFlow (never a raycap dependency); bench/train.py runs it in a subprocess
(`--tf-python`) between its own rounds and compares. The model and step are the tutorial's code: CNN_Encoder
(Dense + relu), BahdanauAttention, RNN_Decoder (Embedding, a Keras GRU called on one time step, fc1, fc2),
the masked SparseCategoricalCrossentropy, a `tf.function` train_step with a Python loop over the padded
caption length (traced once, so one graph holds every step), Adam at its default learning rate. Inputs:
a batch of `--batch` captions padded to `--max-length` tokens, one copy of the 64x2048 features per caption.
Prints one JSON line: {"captions_per_second": best of the rounds, "captions_per_cpu_second": the same per
second of CPU time used (steadier on a shared machine), ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCAB, EMBEDDING, UNITS = 5001, 256, 512  # top_k + 1, embedding_dim, units


class BahdanauAttention(tf.keras.Model):
    def __init__(self, units: int) -> None:
        super().__init__()
        self.W1 = tf.keras.layers.Dense(units)
        self.W2 = tf.keras.layers.Dense(units)
        self.V = tf.keras.layers.Dense(1)

    def call(self, features: tf.Tensor, hidden: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        hidden_with_time_axis = tf.expand_dims(hidden, 1)
        attention_hidden_layer = tf.nn.tanh(self.W1(features) + self.W2(hidden_with_time_axis))
        score = self.V(attention_hidden_layer)
        attention_weights = tf.nn.softmax(score, axis=1)
        context_vector = tf.reduce_sum(attention_weights * features, axis=1)
        return context_vector, attention_weights


class CNNEncoder(tf.keras.Model):
    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.fc = tf.keras.layers.Dense(embedding_dim)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(self.fc(x))


class RNNDecoder(tf.keras.Model):
    def __init__(self, embedding_dim: int, units: int, vocab_size: int) -> None:
        super().__init__()
        self.units = units
        self.embedding = tf.keras.layers.Embedding(vocab_size, embedding_dim)
        self.gru = tf.keras.layers.GRU(
            units, return_sequences=True, return_state=True, recurrent_initializer="glorot_uniform"
        )
        self.fc1 = tf.keras.layers.Dense(units)
        self.fc2 = tf.keras.layers.Dense(vocab_size)
        self.attention = BahdanauAttention(units)

    def call(self, x: tf.Tensor, features: tf.Tensor, hidden: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        context_vector, attention_weights = self.attention(features, hidden)
        x = self.embedding(x)
        x = tf.concat([tf.expand_dims(context_vector, 1), x], axis=-1)
        output, state = self.gru(x)
        x = self.fc1(output)
        x = tf.reshape(x, (-1, x.shape[2]))
        return self.fc2(x), state, attention_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="captions per step (BATCH_SIZE)")
    parser.add_argument("--max-length", type=int, default=22, help="the data set's longest caption")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TensorFlow's default, all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    encoder, decoder = CNNEncoder(EMBEDDING), RNNDecoder(EMBEDDING, UNITS, VOCAB)
    optimizer = tf.keras.optimizers.Adam()
    loss_object = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def loss_function(real: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        mask = tf.cast(tf.math.logical_not(tf.math.equal(real, 0)), tf.float32)
        return tf.reduce_mean(loss_object(real, pred) * mask)

    @tf.function
    def train_step(img_tensor: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss = 0.0
        hidden = tf.zeros((target.shape[0], UNITS))  # decoder.reset_state
        dec_input = tf.expand_dims([2] * target.shape[0], 1)  # <start>
        with tf.GradientTape() as tape:
            features = encoder(img_tensor)
            for i in range(1, target.shape[1]):
                predictions, hidden, _ = decoder(dec_input, features, hidden)
                loss += loss_function(target[:, i], predictions)
                dec_input = tf.expand_dims(target[:, i], 1)
        total_loss = loss / int(target.shape[1])
        variables = encoder.trainable_variables + decoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, total_loss

    target = np.zeros((args.batch, args.max_length), np.int32)
    for k in range(args.batch):  # <start>, 8-15 words, <end>, then padding
        words = rng.integers(4, VOCAB, int(rng.integers(8, 16)))
        target[k, : len(words) + 2] = [2, *words, 3]
    img_tensor = tf.constant(rng.random((args.batch, 64, 2048), dtype=np.float32))
    target_t = tf.constant(target)
    started = time.perf_counter()
    train_step(img_tensor, target_t)[0].numpy()  # traces the graph
    trace_seconds = time.perf_counter() - started
    best, best_cpu = 0.0, 0.0
    for _ in range(args.rounds):
        train_step(img_tensor, target_t)[0].numpy()
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            train_step(img_tensor, target_t)[0].numpy()
        best = max(best, args.steps * args.batch / (time.perf_counter() - started))
        best_cpu = max(best_cpu, args.steps * args.batch / (time.process_time() - cpu))
    print(
        json.dumps(
            {
                "captions_per_second": best,
                "captions_per_cpu_second": best_cpu,
                "tensorflow": tf.__version__,
                "trace_seconds": round(trace_seconds, 1),
                "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "batch": args.batch,
                "max_length": args.max_length,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
