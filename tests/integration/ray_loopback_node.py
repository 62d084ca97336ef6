"""``ray start --address ...`` for a second node on this machine, kept on 127.0.0.1.

Ray 2.60 on Linux binds to the interface address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(docs/stack-pitfalls.md), but with that setting `ray start --address` refuses to join ("Multi-node Ray
clusters are not supported on Windows and OSX"). This wrapper runs the real `ray start` with the
variable at 0 (so every process it spawns resolves loopback) and lifts only that refusal.
Used by the two-node test; run as ``python ray_loopback_node.py start --address=127.0.0.1:PORT ...``.
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services

ray_constants.ENABLE_RAY_CLUSTER = True  # lift the refusal to join
# ...while addresses stay on loopback, as they do with the variable at 0:
services.get_node_ip_address = lambda address=None: "127.0.0.1"
services.resolve_ip_for_localhost = lambda host: "127.0.0.1" if services.is_localhost(host) else host

from ray.scripts.scripts import main  # noqa: E402

sys.exit(main())
