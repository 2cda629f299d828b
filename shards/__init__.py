"""Dataset builders writing WebDataset shards in img2dataset's layout.

- ``python -m shards.world``: the embedded world (pairs or triplets) + its tokenizer.json
- ``python -m shards.cc15m``: CC3M + CC12M through img2dataset (isolated venv), nouns tagged, validated
- ``python -m shards.nouns``: each caption's spaCy nouns into its sample's JSON, once
- ``python -m shards.check``: read a shard set through the trainer's pipeline, print a summary
"""
