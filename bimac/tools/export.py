"""Checkpoint interchange with open_clip (safetensors only; nothing pickled is ever loaded).

    bimac export --checkpoint runs/demo/pretrain/export --to-open-clip runs/demo/open_clip [--name N]
        -> open_clip.create_model_and_transforms("local-dir:runs/demo/open_clip") and
           open_clip.get_tokenizer("local-dir:runs/demo/open_clip") (the export's own tokenizer;
           one open_clip cannot load is refused), or after
           open_clip.add_model_config("runs/demo/open_clip/N.json"):
           open_clip.create_model_and_transforms("N", pretrained="runs/demo/open_clip/open_clip_model.safetensors")
    bimac export --from-open-clip coca_ViT-B-32 --pretrained mscoco_finetuned_laion2b_s13b_b90k \
        --out runs/init [--tokenizer coca_ViT-B-32]
        -> a BiMAC export with open_clip's CoCa weights, and runs/init/model.yaml to pretrain from
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> object:
    from bimac import interchange
    from bimac.config import ConfigError

    ap = argparse.ArgumentParser(
        prog="bimac export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--checkpoint", help="BiMAC export directory to convert to open_clip")
    ap.add_argument("--to-open-clip", metavar="DIR", help="output folder of the open_clip export")
    ap.add_argument(
        "--name",
        default=None,
        help="open_clip model name (default: bimac-<hash of the tower config>)",
    )
    ap.add_argument(
        "--from-open-clip",
        metavar="ARCH",
        help="open_clip CoCa architecture (name, <name>.json, or an open_clip export "
        "folder) whose weights start a BiMAC",
    )
    ap.add_argument(
        "--pretrained",
        default=None,
        help="with --from-open-clip: open_clip pretrained tag or weights file",
    )
    ap.add_argument("--out", default=None, help="with --from-open-clip: BiMAC export folder")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="with --from-open-clip: tokenizer name saved beside the model (default: copied "
        "from an export folder, else none); with --to-open-clip: tokenizer.json or open_clip "
        "name (default: the export's own)",
    )
    args = ap.parse_args(argv)
    if args.checkpoint and args.to_open_clip:
        try:
            files = interchange.export_open_clip(
                args.checkpoint, args.to_open_clip, args.name, args.tokenizer
            )
        except (ConfigError, OSError) as exn:
            raise SystemExit(f"bimac export: {exn}") from None
        print(f"open_clip model {files.name}: config {files.config}, weights {files.weights}")
        return files
    if args.from_open_clip and args.pretrained and args.out:
        interchange.import_open_clip(args.from_open_clip, args.pretrained, args.out, args.tokenizer)
        print(
            f"BiMAC export with open_clip weights: {args.out} (model config: {args.out}/model.yaml)"
        )
        return args.out
    ap.error(
        "give --checkpoint with --to-open-clip, or --from-open-clip with --pretrained and --out"
    )
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
