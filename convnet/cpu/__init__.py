"""Kernels written for XLA's CPU backend, chosen through convnet/ops.py (ops='cpu' or 'auto').

Each module is one idea; each gives the same numbers as the library op it replaces,
and the tests check it against that op and against NumPy. Measurements of what each
saves are in docs/performance.md, not here.

  conv.py     im2col convolution with a hand-written backward pass
  winograd.py Winograd's F(2, 3) along the width: a third fewer multiplications (CHWN)
  pool.py     tiled max/avg pooling, the max's gradient to each window's first maximum
  phases.py   a one-channel conv and its max pool as one matmul over the pool's phases
  dropout.py  nn.Dropout's masks with the threefry hash written out
  layout.py   CHWN (batch innermost) for the conv blocks
  memory.py   glibc malloc keeping freed memory for XLA's per-call scratch
"""
