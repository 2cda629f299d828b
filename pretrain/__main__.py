"""``python -m pretrain --config configs/pretrain/tiny.yaml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bimac.engine import RUN_ERRORS
from pretrain import run_pretraining


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__)
    p.add_argument("--config", required=True, help="experiment YAML (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = run_pretraining(args.config, args.overrides)
    except RUN_ERRORS as err:
        print(f"[rank{rank}] error: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        print(
            f"{result.status} at step {result.step}; checkpoint: {result.checkpoint}; "
            f"export: {result.export_dir}; summary: {result.summary.get('final_losses')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
