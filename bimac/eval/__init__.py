"""Evaluation scripts, each ``python -m bimac.eval.<task>`` with ``main(argv=None) -> dict``:
``retrieval``, ``classification``, ``captioning``, ``probe``. Scoring cores take embeddings,
similarities or captions; :mod:`bimac.eval.common` holds model loading and data readers."""
