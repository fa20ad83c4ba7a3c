import os
import sys

from .run import main

main()
# A rank whose run finished leaves without the interpreter's teardown, as the supervised path's training
# processes do (multiprocessing ends its children with os._exit). Under torchrun, freeing torch's and gloo's
# native objects at interpreter exit has aborted a finished rank (SIGABRT right after the run's last
# checkpoint, once in CI on 2026-12-07; pytorch/pytorch#179291 is the same class), and torchrun then fails
# the whole job. destroy_process_group cannot prevent it alone: after a dp_shard=2 run of train(), the gloo
# threads of all four of its groups outlived it, their device meshes kept alive by DTensor specs that no
# Python object refers to (found 2026-12-07; torch's redistribute, sharding and dynamo caches cleared did not
# free them).
# Everything the run writes is closed and flushed by now; a failure still raises above.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
