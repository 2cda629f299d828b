"""Crash a launched run right after a chosen checkpoint save, at that step and no later.

Python imports ``sitecustomize`` at start-up from the path, so every process of a run launched
with ``process_tree.crash_after_save_env(checkpoint)`` (the launcher, torchrun's workers, their
loader workers) loads this. When rank 0 points ``latest`` beside ``checkpoint`` at it, the whole
launched tree is SIGKILLed at once: the crash a polling test meant, without its race (a fast run
could save the next checkpoint, or finish, before the poll saw this one).
"""

import os
import sys
from pathlib import Path

_VAR = "BIMAC_TEST_SIGKILL_AFTER_SAVE"
_CHECKPOINT = os.environ.get(_VAR)

if _CHECKPOINT:
    _replace = os.replace

    def _replace_then_crash(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        ckpt = Path(_CHECKPOINT)
        if (
            Path(dst).absolute() == ckpt.parent / "latest"
            and ckpt.parent.joinpath("latest").read_text().strip() == ckpt.name
        ):
            import psutil

            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from process_tree import kill_tree

            root = psutil.Process()  # up to the outermost ancestor launched with the variable
            while (parent := root.parent()) and parent.environ().get(_VAR) == _CHECKPOINT:
                root = parent
            kill_tree(root.pid)

    os.replace = _replace_then_crash
