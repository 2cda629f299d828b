"""Fine-tune and evaluate the PAL Bengali captioner (or a Table 1 baseline: ``model.architecture``).

``python -m finetune.caption_bn --config configs/finetune/caption_bn/tiny.yaml [key=value ...]``
trains with the shared engine (DeepSpeed, AMP, one-cycle AdamW, clipping, resume), exports the
model to ``train.output_dir/export``, then captions the held-out triplets with beam search
(forced ``bn_IN``) and writes BLEU-1..4 / METEOR / BERTScore to ``eval_bn.md`` and ``eval_bn.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from bimac import export_folder
from bimac.config import config_parser, load_config, program, run_main
from bimac.engine import train
from bimac.engine.distributed import init_distributed
from bimac.models.baseline_captioners import load_captioner
from bimac.tasks.caption_bn import CaptionBnConfig, CaptionBnTask, evaluate_captions, metrics_table
from finetune.common import check_inputs, setup_logging

logger = logging.getLogger(__name__)


PROG = "python -m finetune.caption_bn"


def main(argv: list[str] | None = None) -> dict:
    p = config_parser(
        CaptionBnConfig, program(PROG), __doc__, config_help="configs/finetune/caption_bn/*.yaml"
    )
    p.add_argument("--eval-only", metavar="EXPORT_DIR", help="skip training; evaluate this export")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(CaptionBnConfig, args.config, args.overrides)
    if args.eval_only:
        export_folder.check(args.eval_only, "--eval-only")
    else:
        check_inputs(cfg)
    out = Path(cfg.train.output_dir)
    if args.eval_only:
        export_dir, rank = Path(args.eval_only), 0
    else:
        rank, world = init_distributed()
        result = train(CaptionBnTask(cfg, world), cfg.train, cfg)
        if result.status != "completed":
            logger.info("training %s at step %d; evaluation skipped", result.status, result.step)
            return {}
        export_dir = result.export_dir
    if rank != 0 or not cfg.eval.enabled or export_dir is None:
        return {}
    model = load_captioner(export_dir)
    scores, rows = evaluate_captions(model, cfg)
    table = metrics_table(scores)
    out.mkdir(parents=True, exist_ok=True)  # --eval-only into a folder no training made
    (out / "eval_bn.md").write_text(table + "\n")
    (out / "eval_bn.json").write_text(
        json.dumps({"scores": scores, "captions": rows}, ensure_ascii=False, indent=1)
    )
    print(table)
    for sid, cap, ref in rows[: cfg.eval.show]:
        print(f"{sid}\n  caption:   {cap}\n  reference: {ref}")
    return scores


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
