"""convnet: conv and pooling blocks in JAX/Flax, trained data-parallel with pmap."""
