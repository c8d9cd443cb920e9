"""One of two JAX processes meeting through ssb_jax.distributed after an uneven wait.

    python tests/distributed_worker.py PORT PROCESS_ID LATE_SECONDS
"""
import sys
import time

import jax

from ssb_jax import distributed

port, process_id, late = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
jax.devices()  # both backends up before the uneven part
if process_id == 1:
    time.sleep(late)  # longer than a device collective would wait
start = time.time()
distributed.barrier("after-uneven-work")
total = distributed.sum_over_processes(10 * (process_id + 1))
second = distributed.sum_over_processes(process_id)  # the same meeting name twice gets distinct ids
print(f"process {process_id}: waited {time.time() - start:.1f}s, sums {total} {second}", flush=True)
