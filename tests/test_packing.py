"""Packing: several examples per row change nothing in the loss; the row layout, truncation,
statistics, shuffling and bucketing are exactly as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.data.packing import (
    batches,
    bucket_by_length,
    num_batches,
    pack,
    target_tokens_per_batch,
)
from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row, sequence_loss
from kaggle_pipeline.train import update_token_counts


def _example(ids, prompt_len: int):
    ids = np.asarray(ids, np.int32)
    targets = np.arange(len(ids)) >= prompt_len
    return ids, targets


def _random_examples(count: int, vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(3, 15))
        out.append(_example(rng.integers(1, vocab_size, n), prompt_len=int(rng.integers(1, n))))
    return out


def _loss_of_rows(model, params, rows):
    batch = add_target_slots({k: np.stack([r[k] for r in rows]) for k in rows[0]},
                             max_targets_per_row(rows))
    total, count = jax.jit(lambda p, b: sequence_loss(model, {"params": p}, b))(
        params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(total), int(count)


def test_packed_loss_equals_one_example_per_row():
    # Window 4 < example lengths: a position that did not restart would move the window.
    config = tiny_config("gemma2", num_layers=2, sliding_window=4)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                          abstract_params(config))
    examples = _random_examples(12, config.vocab_size)

    packed, packed_stats = pack(examples, 24)
    alone, alone_stats = pack(examples, 24, pack_rows=False)
    assert len(alone) == 12 and len(packed) < 6
    assert max(int(r["segment_ids"].max()) for r in packed) >= 3
    assert packed_stats.real_tokens == alone_stats.real_tokens == sum(len(e[0]) for e in examples)

    model = Transformer(config)
    packed_sum, packed_count = _loss_of_rows(model, params, packed)
    alone_sum, alone_count = _loss_of_rows(model, params, alone)
    expected_count = sum(int(t[1:].sum()) for _, t in examples)
    assert packed_count == alone_count == expected_count
    np.testing.assert_allclose(packed_sum, alone_sum, rtol=1e-5)

    # Without the segment ids, packed examples see each other and the loss moves.
    leaky = [{**r, "segment_ids": np.where(r["segment_ids"] > 0, 1, 0).astype(np.int32)}
             for r in packed]
    assert abs(_loss_of_rows(model, params, leaky)[0] - alone_sum) > 1e-3 * abs(alone_sum)


def test_row_layout_positions_segments_and_targets():
    # Lengths 3, 4, 2, 7 into rows of 10, first-fit by decreasing length:
    # 7 -> row 0; 4 -> row 1; 3 -> row 0 (full); 2 -> row 1. Rows keep input order.
    examples = [_example([11, 12, 13], 1), _example([21, 22, 23, 24], 2), _example([31, 32], 0),
                _example([41, 42, 43, 44, 45, 46, 47], 5)]
    rows, stats = pack(examples, 10)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["tokens"], [11, 12, 13, 41, 42, 43, 44, 45, 46, 47])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(rows[0]["targets"], [0, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(rows[1]["tokens"], [21, 22, 23, 24, 31, 32, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 2, 2, 0, 0, 0, 0])
    # Example 3's first token is marked a target but has nothing before it in its segment.
    np.testing.assert_array_equal(rows[1]["targets"], [0, 0, 1, 1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[0]["example_index"], [0, 0, 0, 3, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(rows[1]["example_index"], [1, 1, 1, 1, 2, 2, -1, -1, -1, -1])
    assert {k: v.dtype for k, v in rows[0].items()} == {
        "tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "targets": bool,
        "example_index": np.int32}

    assert (stats.examples, stats.truncated, stats.dropped) == (4, 0, 0)
    assert (stats.real_tokens, stats.row_tokens) == (16, 20)
    assert stats.efficiency == pytest.approx(0.8)
    assert "padding efficiency 80.0%" in stats.summary()
    _, alone = pack(examples, 10, pack_rows=False)
    assert (alone.real_tokens, alone.row_tokens) == (16, 40)
    assert alone.efficiency == pytest.approx(0.4)


def test_truncation_keeps_the_answer_and_is_counted():
    ids = np.arange(1, 21)
    answer_at_end = _example(ids, 15)  # targets 15..19
    answer_at_start = (ids, (ids >= 3) & (ids <= 5))  # targets at indices 2..4
    no_target = (np.arange(1, 6), np.zeros(5, bool))
    only_first = (np.arange(1, 6), np.arange(5) == 0)  # nothing to predict it from
    short = _example(ids[:4], 2)
    rows, stats = pack([answer_at_end, answer_at_start, no_target, only_first, short], 8)
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 2)
    tokens = sorted(tuple(r["tokens"][r["segment_ids"] == s]) for r in rows
                    for s in range(1, r["segment_ids"].max() + 1))
    # The end of the long example (its answer) and the start of the other survive.
    assert tokens == [tuple(range(1, 5)), tuple(range(1, 9)), tuple(range(13, 21))]
    end_row = next(r for r in rows if r["tokens"][0] == 13)
    np.testing.assert_array_equal(end_row["targets"], [0, 0, 0, 1, 1, 1, 1, 1])
    # example_index points back into the input list, skipping the dropped ones.
    assert sorted(int(r["example_index"][0]) for r in rows) == [0, 1, 4]
    assert int(end_row["example_index"][0]) == 0
    assert "truncated 2, dropped 2" in stats.summary()


def _row_ids(batch):
    """Each row is identified by its first token (0 for the padding rows)."""
    return [int(t) for t in batch["tokens"][:, 0]]


def test_batches_are_shuffled_deterministically_by_seed_and_epoch():
    rows = [{"tokens": np.full(4, i + 1, np.int32), "positions": np.arange(4, dtype=np.int32),
             "segment_ids": np.ones(4, np.int32), "targets": np.ones(4, bool),
             "example_index": np.full(4, i, np.int32)}
            for i in range(10)]

    def order(**kw):
        return [i for b in batches(rows, 4, **kw) for i in _row_ids(b)]

    first = order(seed=3, epoch=0)
    assert first == order(seed=3, epoch=0)
    assert sorted(i for i in first if i) == list(range(1, 11))  # each row exactly once
    assert first[-2:] == [0, 0]  # the partial batch is padded with empty rows
    assert order(seed=3, epoch=1) != first and order(seed=4, epoch=0) != first
    assert order(seed=3, epoch=0, shuffle=False) == list(range(1, 11)) + [0, 0]

    last = list(batches(rows, 4, seed=3, epoch=0))[-1]
    assert not last["segment_ids"][2:].any() and not last["targets"][2:].any()
    assert (last["example_index"][2:] == -1).all()
    assert all(b["tokens"].shape == (4, 4) for b in batches(rows, 4, seed=3, epoch=0))
    kept = list(batches(rows, 4, seed=3, epoch=0, drop_last=True))
    assert len(kept) == num_batches(10, 4, drop_last=True) == 2
    assert num_batches(10, 4) == len(list(batches(rows, 4, seed=0, epoch=0))) == 3


def test_length_buckets_group_similar_lengths_longest_first():
    lengths = [5, 40, 12, 7, 33, 1, 12, 20]
    groups = bucket_by_length(lengths, 3)
    assert [len(g) for g in groups] == [3, 3, 2]
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    spans = [[lengths[i] for i in g] for g in groups]
    assert spans == [[40, 33, 20], [12, 12, 7], [5, 1]]


def test_target_token_counts_match_the_batches_and_group_by_update():
    rng = np.random.default_rng(0)
    rows = [{"tokens": np.full(6, i + 1, np.int32), "positions": np.arange(6, dtype=np.int32),
             "segment_ids": np.ones(6, np.int32), "targets": rng.random(6) < 0.5,
             "example_index": np.full(6, i, np.int32)}
            for i in range(7)]
    for epoch in range(2):
        built = [int(b["targets"].sum()) for b in batches(rows, 2, seed=1, epoch=epoch)]
        assert target_tokens_per_batch(rows, 2, seed=1, epoch=epoch) == built
    per_step = [n for e in range(2) for n in target_tokens_per_batch(rows, 2, seed=1, epoch=e)]
    assert len(per_step) == 8
    groups = update_token_counts(rows, 2, seed=1, epochs=2, accumulate_steps=3)
    # Updates take micro-steps 0-2, 3-5 (across the epoch boundary) and the partial 6-7.
    want = [sum(per_step[0:3])] * 3 + [sum(per_step[3:6])] * 3 + [sum(per_step[6:8])] * 2
    assert groups == want
    assert update_token_counts(rows, 2, seed=1, epochs=2, accumulate_steps=1) == per_step
