"""Re-export of :mod:`flatlens.distributed` (training and measurement share one set of helpers)."""

from flatlens.distributed import *  # noqa: F401,F403
from flatlens.distributed import DistContext, all_reduce_sum, barrier, broadcast_object, resolve_device, setup, teardown  # noqa: F401
