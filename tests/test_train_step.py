"""The Trainer's jitted step: its loss and gradient equal an independent full-logits
computation (padding rows included); remat, LoRA dropout and gradient accumulation behave."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kaggle_pipeline.data.packing import pack
from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig, init_lora
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row
from kaggle_pipeline.model.sharding import make_mesh
from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
from kaggle_pipeline.training.step import Trainer

CONFIG = tiny_config("gemma2", num_layers=2, sliding_window=4)
LORA = LoraConfig(rank=4, alpha=8.0, targets=ATTENTION_TARGETS + MLP_TARGETS)
LR = 0.05


def _random(tree, seed: int, std: float) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (std * rng.standard_normal(x.shape)).astype(np.float32), tree)


# Host (numpy) trees: every trainer copies them, so a donated state never deletes them.
PARAMS = _random(abstract_params(CONFIG), 0, 0.2)
TRAINED_LORA = _random(jax.eval_shape(lambda: init_lora(CONFIG, LORA, jax.random.key(0))), 1, 0.2)


def _rows(seed: int = 0) -> list[dict]:
    """Three packed rows and an empty padding row, as the last batch of an epoch has."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(9):
        n = int(rng.integers(4, 16))
        examples.append((rng.integers(1, CONFIG.vocab_size, n), np.arange(n) >= n // 2))
    rows, _ = pack(examples, 24)
    return rows[:3] + [{k: np.zeros_like(v) for k, v in rows[0].items()}]


def _stack(rows: list[dict], width: int) -> dict:
    return add_target_slots({k: np.stack([r[k] for r in rows]) for k in rows[0]}, width)


def _batch(seed: int = 0) -> dict:
    rows = _rows(seed)
    return _stack(rows, max_targets_per_row(rows))


OPTIMIZERS = {
    "sgd": optax.sgd(LR),
    "frozen": optax.sgd(0.0),
    "adam": make_optimizer(OptimConfig(learning_rate=LR, schedule="constant"), 10),
    "adam/2": make_optimizer(OptimConfig(learning_rate=LR, schedule="constant",
                                         accumulate_steps=2), 10),
    "sgd/2": optax.MultiSteps(optax.sgd(LR), every_k_schedule=2),
}
ACCUMULATE = {"adam/2": 2, "sgd/2": 2}


@functools.cache
def _trainer(optimizer: str, seed: int = 0, dropout: float = 0.0,
             remat: bool = False) -> tuple[Trainer, object]:
    """A trainer and its compiled step, shared by the tests that want the same one."""
    model = Transformer(CONFIG, lora_scale=LORA.scale, lora_dropout=dropout,
                        deterministic=dropout == 0.0, remat=remat)
    trainer = Trainer(model, OPTIMIZERS[optimizer], make_mesh(devices=jax.devices()[:1]),
                      "lora", seed=seed, accumulate_steps=ACCUMULATE.get(optimizer, 1))
    return trainer, trainer.compile_step(trainer.init_state(TRAINED_LORA), PARAMS)


def _run(trainer_and_step, batches, update_tokens=None):
    """(per-step metrics, final LoRA factors) after one step per batch from TRAINED_LORA."""
    trainer, step = trainer_and_step
    state = trainer.init_state(TRAINED_LORA)
    metrics = []
    for i, batch in enumerate(batches):
        tokens = None if update_tokens is None else update_tokens[i]
        state, m = step(state, PARAMS, trainer.put_batch(batch, update_tokens=tokens))
        metrics.append(jax.device_get(m))
    assert int(state["step"]) == len(batches)
    return metrics, jax.device_get(state["trainable"])


@jax.jit
@functools.partial(jax.value_and_grad, has_aux=True)
def _reference_loss(lora, batch):
    """Mean next-token loss from the full logits, without the target-slot gather."""
    logits, _ = Transformer(CONFIG, lora_scale=LORA.scale).apply(
        {"params": PARAMS, "lora": lora}, batch["tokens"], batch["positions"],
        batch["segment_ids"])
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    mask = batch["targets"][:, 1:]
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.sum(mask), jnp.sum(mask)


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_step_loss_and_gradient_equal_the_full_logits_reference():
    """Also on a padding row: it adds nothing to the loss, its count or the gradient."""
    batch = _batch()
    assert not batch["targets"][3].any() and batch["targets"][:3].any(axis=1).all()
    (metrics,), updated = _run(_trainer("sgd"), [batch])
    (ref_loss, ref_count), ref_grad = _reference_loss(TRAINED_LORA, batch)

    assert int(metrics["target_tokens"]) == int(ref_count) == int(batch["targets"].sum())
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_sum"], ref_loss * ref_count, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref_grad), rtol=1e-5)
    # SGD: the step moved every factor by exactly -lr * gradient.
    step_grad = jax.tree.map(lambda new, old: (old - new) / LR, updated, TRAINED_LORA)
    assert _max_diff(step_grad, ref_grad) <= 1e-5 * float(optax.tree.norm(ref_grad))


def test_remat_gives_the_same_step():
    batch = _batch()
    (m1,), lora1 = _run(_trainer("sgd"), [batch])
    (m2,), lora2 = _run(_trainer("sgd", remat=True), [batch])
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    assert _max_diff(lora2, lora1) <= 1e-6


def test_lora_dropout_is_reproducible_and_changes_per_step():
    batch = _batch()

    def losses():  # lr 0: only the dropout mask can change the loss
        return [float(m["loss"]) for m in _run(_trainer("frozen", dropout=0.5), [batch] * 2)[0]]

    first = losses()
    assert first == losses()  # the masks come from the trainer's seed and the step number
    assert first[0] != first[1]  # a fresh mask each step
    (plain,), _ = _run(_trainer("sgd"), [batch])
    assert abs(first[0] - float(plain["loss"])) > 1e-4  # dropout is on


def test_repeated_steps_fit_a_batch():
    metrics, _ = _run(_trainer("adam"), [_batch()] * 10)
    losses = [float(m["loss"]) for m in metrics]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_accumulated_micro_batches_make_one_update():
    batch = _batch()
    _, one_step = _run(_trainer("adam"), [batch])
    _, first_micro = _run(_trainer("adam/2"), [batch])
    _, two_micro = _run(_trainer("adam/2"), [batch, batch])
    assert _max_diff(first_micro, TRAINED_LORA) == 0.0  # no update before the 2nd micro-batch
    assert _max_diff(two_micro, one_step) <= 1e-6  # the mean of two equal gradients
    assert _max_diff(one_step, TRAINED_LORA) > 1e-2


def test_accumulation_weighs_micro_batches_by_their_target_tokens():
    """Two micro-batches with different numbers of target tokens make the update one batch
    of all their rows makes (plain SGD, so the gradient's scale shows in the result)."""
    first, second = _rows(0), _rows(3)
    width = max_targets_per_row(first + second)
    counts = [sum(int(r["targets"].sum()) for r in rows) for rows in (first, second)]
    assert counts[0] != counts[1]
    _, one_batch = _run(_trainer("sgd"), [_stack(first + second, width)])
    micro = [_stack(first, width), _stack(second, width)]
    _, accumulated = _run(_trainer("sgd/2"), micro, update_tokens=[sum(counts)] * 2)
    assert _max_diff(accumulated, one_batch) <= 1e-6
    # Control: one mean per micro-batch (what optax.MultiSteps alone averages) differs.
    _, per_micro_mean = _run(_trainer("sgd/2"), micro)
    assert _max_diff(per_micro_mean, one_batch) > 1e-4
