"""The fork server's last preload (``processes.PRELOAD``), imported nowhere else: everything the
server loaded is frozen for the collector of the workers forked from it, and the server, once the
sweep that started it has ended, exits without tearing down torch, MLflow and pandas (1.6 s of
a core, while the terminal stays held, measured). The workers never run this exit handler:
they leave through ``os._exit`` like every forked multiprocessing child."""

import atexit
import gc
import os

gc.freeze()
atexit.register(os._exit, 0)
