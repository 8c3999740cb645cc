"""`python -m shardstack.shim [--run-dir DIR] [--loopback] app.py | -m module [args]`."""

import sys

from shardstack.shim.launcher import run_in_process

raise SystemExit(run_in_process(sys.argv[1:]))
