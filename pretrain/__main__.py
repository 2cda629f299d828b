"""``python -m pretrain --config configs/pretrain/tiny.yaml [section.key=value ...]``: BiMAC
pretraining on the shared engine (DeepSpeed ZeRO; one process per rank under torchrun / srun)."""

from __future__ import annotations

import logging
import os
import sys

from bimac.config import config_parser, program, run_main
from bimac.engine import derive_accumulation
from bimac.tasks.pretrain import BiMACPretrain, PretrainConfig, load_pretrain_config
from pretrain import run_pretraining

PROG = "python -m pretrain"


def main(argv: list[str] | None = None) -> int:
    p = config_parser(PretrainConfig, program(PROG), __doc__, config_help="configs/pretrain/*.yaml")
    p.add_argument(
        "--check",
        action="store_true",
        help="check the config, shards and tokenizer, then exit (slurm/pretrain.sh runs this once "
        "before it launches the ranks, so a mistake is one line, not one per rank)",
    )
    p.add_argument(
        "--world-size", type=int, default=0, help="with --check: the number of ranks to launch"
    )
    args = p.parse_args(argv)
    if args.check:
        cfg = load_pretrain_config(args.config, args.overrides)
        BiMACPretrain(cfg)  # the tokenizer, shard pattern and noun pipeline are checked here
        if args.world_size:
            derive_accumulation(
                cfg.train.global_batch_size, cfg.train.micro_batch_size, args.world_size
            )
        print(f"{args.config}: ok")
        return 0
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    result = run_pretraining(args.config, args.overrides)
    if rank == 0:
        print(
            f"{result.status} at step {result.step}; checkpoint: {result.checkpoint}; "
            f"export: {result.export_dir}; summary: {result.summary.get('final_losses')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
