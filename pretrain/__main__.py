"""``python -m pretrain --config configs/pretrain/tiny.yaml [section.key=value ...]``: BiMAC
pretraining on the shared engine (DeepSpeed ZeRO; one process per rank under torchrun / srun)."""

from __future__ import annotations

import logging
import os
import sys

from bimac.config import config_parser, program, run_main
from bimac.engine import RUN_ERRORS
from bimac.tasks.pretrain import PretrainConfig
from pretrain import run_pretraining

PROG = "python -m pretrain"


def main(argv: list[str] | None = None) -> int:
    p = config_parser(PretrainConfig, program(PROG), __doc__, config_help="configs/pretrain/*.yaml")
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
    sys.exit(run_main(main, PROG))
