"""The README's Extend table, row by row, done as it says: a new activation or norm layer
is one registry entry, and then a config can name it, it changes the output, and the
CPU kernels (both layouts) and the library ops compute the same; a per-block option is
a ConvBlock field and its use. (Pools: test_shapes.)"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from convnet import config_lib, models, train
from convnet import ops as ops_lib
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


PER_BLOCK_OPTION = '''
import jax, numpy as np
from convnet import models

class ConvBlock(models.ConvBlock):  # The README's row: the field (with its default) ...
  gain: int = 1  # Multiplies the block's output.

  def __call__(self, x, train=False):  # ... and its use. Nothing else is edited.
    return super().__call__(x, train) * self.gain

models.ConvBlock = ConvBlock  # As if the field were written into convnet/models.py.
from configs import default
from convnet import config_lib, train

config = default.get_config('smoke')
assert config.model.gain == (1,)  # A config key at once, at its default.
config.model.update(num_blocks=2, filters=(4, 8), gain=(2, 3), ops='xla')
config_lib.validate(config, 1)
x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
model = train.build_model(config.model, axis_name=None)
assert [b['gain'] for b in model.blocks] == [2, 3]
variables = model.init(jax.random.key(0), x)
config.model.gain = (1,)
plain = train.build_model(config.model, axis_name=None)
assert not np.allclose(model.apply(variables, x), plain.apply(variables, x), atol=1e-3)
block = {'params': variables['params']['ConvBlock_0']}
np.testing.assert_allclose(ConvBlock(**model.blocks[0]).apply(block, x),
                           2 * ConvBlock(**plain.blocks[0]).apply(block, x), rtol=1e-5, atol=1e-6)
config.model.gain = (0,)
try:
  config_lib.validate(config, 1)
except config_lib.ConfigError as e:
  print('refused:', e)
'''


def test_a_per_block_option_is_a_field_and_its_use(tmp_path):
  """A new ConvBlock field with a default is a per-block config key at once (in
  configs/default.py, validated, passed to each block): two edits, done here in a
  subclass in a fresh interpreter."""
  script = tmp_path / 'option.py'
  script.write_text(PER_BLOCK_OPTION)
  done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, 'PYTHONPATH': REPO})
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == 'refused: model.gain must be > 0, got (0,)'


def test_the_fused_cpu_kernel_declines_a_block_with_a_field_it_does_not_know():
  """The one-matmul conv + max pool (CPU kernels, CHWN) knows ops.FUSED_FIELDS; a block
  that sets any other per-block field (here a new one) takes conv2d and pool2d instead."""
  class ConvBlock(models.ConvBlock):
    taps_shift: int = 1  # As if a new conv option: only conv2d would be taught it.

  cpu = ops_lib.Ops('cpu', 'CHWN')
  plain = dict(filters=4, kernel_size=3, pool='max', pool_size=2, pool_stride=2, ops=cpu)
  assert cpu.pools_with_conv(ConvBlock(**plain), in_channels=1)
  assert not cpu.pools_with_conv(ConvBlock(**plain, taps_shift=2), in_channels=1)
  assert not cpu.pools_with_conv(ConvBlock(**plain, dilation=2), in_channels=1)
