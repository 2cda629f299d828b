"""Captioning and retrieval metrics.

- :mod:`bimac.metrics.cider`: ``cider_d(cands, refs) -> (mean, per_caption)``; ``CiderD(corpus)``
  with ``.score(cands, refs)`` for training rewards (vectorised, equals pycocoevalcap).
- :mod:`bimac.metrics.bleu`: ``bleu(cands, refs) -> ([B1..B4], per_caption)`` (pycocoevalcap).
- :mod:`bimac.metrics.meteor`: ``Meteor.shared(lang).score(cands, refs)`` (jar, one JVM).
- :mod:`bimac.metrics.spice`: ``spice(...)`` or :class:`SpiceUnavailable`.
- :mod:`bimac.metrics.bertscore`: ``bertscore(cands, refs, lang, model, layer)``.
- :mod:`bimac.metrics.recall`: ``retrieval_metrics(image_emb, text_emb, text_to_image)``.
- :mod:`bimac.metrics.text`: tokenisation (PTB for English, ``normalize_bn`` for Bengali).
"""
