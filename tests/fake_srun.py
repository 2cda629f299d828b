#!/usr/bin/env python3
"""A stand-in for SLURM's ``srun`` on one machine: starts ``--nodes x --ntasks-per-node`` copies
of the command with the variables srun gives each task (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_NODEID), and with ``--kill-on-bad-exit=1`` ends the others when one fails.
Exit status: the first non-zero one of the tasks, like srun's."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("--"):
        key, _, value = argv[i][2:].partition("=")
        opts[key] = value
        i += 1
    command = argv[i:]
    nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
    procs = []
    for rank in range(nodes * per_node):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node),
               "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node)}  # fmt: skip
        procs.append(subprocess.Popen(command, env=env))
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            if opts.get("kill-on-bad-exit") == "1":
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        time.sleep(0.1)
    return status or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
