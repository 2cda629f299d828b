"""The ``bimac`` command (``python -m cli``): thin subcommands over the entry points and tools.

    bimac pretrain --config configs/pretrain/tiny.yaml [key=value ...]
    bimac finetune retrieval|caption|classification|caption_bn --config ... [key=value ...]
    bimac eval retrieval|classification|captioning|probe|world ...
    bimac caption IMG... --checkpoint DIR          (English BiMAC or Bengali PAL export)
    bimac classify IMG... --checkpoint DIR --labels a,b,c
    bimac retrieve --checkpoint DIR --images DIR --query "..."
    bimac ground IMG "a red circle left of a blue square" --checkpoint DIR
    bimac export --checkpoint DIR --to-open-clip OUT   |   --from-open-clip ARCH --pretrained W --out DIR
    bimac report RUN_DIR... [--out report.md]

``bimac COMMAND --help`` explains a command's options and their defaults.
"""

from __future__ import annotations

import importlib
import sys

from bimac.config import run_main

# command -> (module with main(argv), one-line description); `finetune` / `eval` take a stage
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("pretrain.__main__", "BiMAC pretraining on the shared engine (DeepSpeed ZeRO)"),
    "finetune": (
        "finetune.{}",
        "a fine-tuning stage: retrieval, caption, classification, caption_bn",
    ),
    "eval": (
        "bimac.eval.{}",
        "evaluation: retrieval, classification, captioning, probe, world (all four, embedded world)",
    ),
    "caption": ("bimac.tools.caption", "caption images (English BiMAC or Bengali PAL export)"),
    "classify": ("bimac.tools.classify", "zero-shot (--labels) or fine-tuned-head classification"),
    "retrieve": ("bimac.tools.retrieve", "text-to-image search over a folder"),
    "ground": ("bimac.tools.ground", "noun grounding heat maps over an image (BiMAC Fig. 2)"),
    "export": ("bimac.tools.export", "checkpoint interchange with open_clip"),
    "report": ("bimac.tools.report", "markdown results page with the papers' tables and plots"),
}
STAGES = {
    "finetune": ("retrieval", "caption", "classification", "caption_bn"),
    "eval": ("retrieval", "classification", "captioning", "probe", "world"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """``argv`` -> (module name, the arguments its ``main`` gets); SystemExit with help/usage."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bimac: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = COMMANDS[command][0]
    if command in STAGES:
        stages = STAGES[command]
        if not rest or rest[0] in ("-h", "--help"):
            print(
                f"usage: bimac {command} {{{','.join(stages)}}} [options]\n\n"
                f"{COMMANDS[command][1]}\n`bimac {command} STAGE --help` explains a stage's "
                "options and their defaults."
            )
            raise SystemExit(0 if rest else 2)
        if rest[0] not in stages:
            print(
                f"bimac {command}: unknown stage {rest[0]!r}; one of {', '.join(stages)}",
                file=sys.stderr,
            )
            raise SystemExit(2)
        module, rest = module.format(rest[0]), rest[1:]
    return module, rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bimac`` console script; a user mistake is one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    module, rest = resolve(argv)
    prog = " ".join(["bimac", *argv[: len(argv) - len(rest)]])
    # argparse names the program after sys.argv[0]: `bimac eval retrieval`, not `bimac`
    saved, sys.argv[0] = sys.argv[0], prog
    try:
        return run_main(importlib.import_module(module).main, prog, rest)
    finally:
        sys.argv[0] = saved


if __name__ == "__main__":
    sys.exit(main())
