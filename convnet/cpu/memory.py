"""glibc's malloc keeping freed memory, for XLA's CPU runtime.

XLA's CPU kernels allocate scratch space on every call. With glibc's defaults, large
freed blocks go back to the OS and the next call faults them in afresh, which can cost
more than the arithmetic. The setting is process-wide and only matters on the CPU.
"""

import ctypes


def keep_freed_memory(limit: int = 1 << 30) -> bool:
  """Makes malloc keep freed blocks of up to `limit` bytes for reuse; False without glibc."""
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))
