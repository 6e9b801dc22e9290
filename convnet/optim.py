"""Learning-rate schedules and optimizers: registries that config validation offers.

A new schedule or optimizer is one entry here; configs can then name it. Each entry
reads what it needs from the config (and the config schema lists those keys).
"""

import optax

# name -> (config, decay_steps) -> schedule over the steps after the warmup.
SCHEDULES = {
    'constant': lambda config, decay_steps: optax.constant_schedule(config.learning_rate),
    'cosine': lambda config, decay_steps: optax.cosine_decay_schedule(config.learning_rate,
                                                                      max(decay_steps, 1)),
}

# name -> (config, learning-rate schedule) -> optax transformation.
OPTIMIZERS = {
    'adam': lambda config, learning_rate: optax.adam(learning_rate),
    'adamw': lambda config, learning_rate: optax.adamw(learning_rate,
                                                       weight_decay=config.weight_decay),
    'sgd': lambda config, learning_rate: optax.sgd(learning_rate,
                                                   momentum=config.momentum or None),
}


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """config.schedule over the run, after a linear warmup from 0 if warmup_epochs > 0."""
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  total_steps = config.num_epochs * steps_per_epoch
  main = SCHEDULES[config.schedule](config, total_steps - warmup_steps)
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  return OPTIMIZERS[config.optimizer](config, learning_rate_fn)
