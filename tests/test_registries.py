"""Every registry entry (activations, norms, pools, optimizers, schedules) trains, and the
ones the kernels compute agree on every kernel path: what a config can name works."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convnet import config_lib, models, optim, shapes
from references import ALL_OPS, OPS_IDS

ENTRIES = ([('activation', name) for name in models.ACTIVATIONS] +
           [('norm', name) for name in models.NORMS] +
           [('pool', name) for name in shapes.POOLS])


def three_steps(mnist, ops_, key: str, name: str):
  """Losses and parameters after three Adam steps of a two-block net on 16 real digits."""
  block = shapes.Block(filters=4, kernel_size=3, stride=1, padding='SAME', norm='none',
                       norm_groups=2, pool='max', pool_size=2, pool_stride=2)
  if key != 'activation':
    block = dataclasses.replace(block, **{key: name})
  blocks = (block, dataclasses.replace(block, filters=8))
  model = models.ConvNet(blocks=blocks, hidden=(16,),
                         activation=name if key == 'activation' else 'relu', ops=ops_)
  x = jnp.asarray((mnist.train.images[:16] / 255.0 - 0.13) / 0.31, jnp.float32)
  labels = jnp.asarray(mnist.train.labels[:16])
  variables = models.ConvNet(blocks=blocks, hidden=(16,)).init(jax.random.key(0), x)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, changes), updates.get('batch_stats', stats), opt_state,
            loss)

  params, stats = variables['params'], variables.get('batch_stats', {})
  opt_state, losses = tx.init(params), []
  for _ in range(3):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  return losses, params


@pytest.mark.parametrize('key,name', ENTRIES, ids=[f'{k}={n}' for k, n in ENTRIES])
def test_every_activation_norm_and_pool_trains_alike_on_every_kernel_path(mnist, key, name):
  runs = {ops_id: three_steps(mnist, ops_, key, name) for ops_, ops_id in zip(ALL_OPS, OPS_IDS)}
  losses, params = runs['xla']
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for ops_id, (other_losses, other_params) in runs.items():
    np.testing.assert_allclose(other_losses, losses, rtol=2e-4, err_msg=ops_id)
    for a, b in zip(jax.tree_util.tree_leaves(other_params), jax.tree_util.tree_leaves(params)):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4, err_msg=ops_id)


@pytest.mark.parametrize('optimizer', list(optim.OPTIMIZERS))
@pytest.mark.parametrize('schedule', list(optim.SCHEDULES))
def test_every_optimizer_and_schedule_trains(smoke_config, optimizer, schedule):
  """Each pair descends a least-squares problem from its config's learning rate."""
  smoke_config.update(optimizer=optimizer, schedule=schedule, learning_rate=0.05, num_epochs=1,
                      warmup_epochs=0.1)
  spec = config_lib.read(smoke_config)
  tx = optim.create_optimizer(spec, optim.create_learning_rate_fn(spec, steps_per_epoch=50))
  target = jnp.linspace(-1.0, 1.0, 8)
  loss = lambda w: jnp.sum((w - target) ** 2)
  w, state = jnp.zeros(8), None
  state = tx.init(w)
  for _ in range(50):
    changes, state = tx.update(jax.grad(loss)(w), state, w)
    w = optax.apply_updates(w, changes)
  assert float(loss(w)) < 0.5 * float(loss(jnp.zeros(8)))
