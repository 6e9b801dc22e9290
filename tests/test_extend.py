"""The README's Extend table, row by row, done as it says: a new activation or norm layer
is one registry entry, and then a config can name it, it changes the output, and the
CPU kernels (both layouts) and the library ops compute the same. (Pools: test_shapes.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnet import config_lib, models, train
from references import ALL_OPS, OPS_IDS


class RMSNorm(models.nn.Module):
  """An RMS norm over the channels at each position, with a per-channel scale."""
  channels: int
  channel_axis: int

  @models.nn.compact
  def __call__(self, x):
    scale = self.param('scale', models.nn.initializers.ones, (self.channels,))
    shape = [1] * x.ndim
    shape[self.channel_axis] = self.channels
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), self.channel_axis, keepdims=True) + 1e-6)
    return y * scale.reshape(shape)


ROWS = {  # README row -> (registry, name, entry, config change)
    'an activation': (models.ACTIVATIONS, 'softsign',
                      models.Activation(jax.nn.soft_sign, nondecreasing=True),
                      lambda config: setattr(config.model, 'activation', 'softsign')),
    'a norm layer': (models.NORMS, 'rms',
                     lambda site: RMSNorm(channels=site.channels, channel_axis=site.channel_axis),
                     lambda config: setattr(config.model, 'norm', ('rms',))),
}


@pytest.mark.parametrize('row', ROWS)
def test_an_extend_row_done_as_the_readme_says_works_on_every_backend(smoke_config, monkeypatch,
                                                                     row):
  registry, name, entry, change = ROWS[row]
  config = smoke_config
  config.model.update(num_blocks=2, filters=(4, 8), hidden=(16,), dropout=0.0)
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))

  def logits(config, ops_):
    config.model.ops, config.model.layout = ops_.backend, ops_.layout
    config_lib.validate(config, 2)
    model = train.build_model(config.model, axis_name=None)
    return model.apply(model.init(jax.random.key(0), x), x)

  before = logits(config, ALL_OPS[0])
  change(config)
  with pytest.raises(config_lib.ConfigError, match='must be one of'):
    config_lib.validate(config, 2)  # Not yet registered.
  monkeypatch.setitem(registry, name, entry)  # The one edit the README names.
  outputs = {ops_id: logits(config, ops_) for ops_, ops_id in zip(ALL_OPS, OPS_IDS)}
  assert not np.allclose(outputs['xla'], before, atol=1e-3)  # It changed the model.
  for ops_id, output in outputs.items():
    np.testing.assert_allclose(output, outputs['xla'], rtol=1e-4, atol=1e-5, err_msg=ops_id)
