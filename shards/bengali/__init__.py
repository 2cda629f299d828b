"""The Bengali triplet corpus of PAL §4.2, in four resumable stages.

``translate`` (MarianMT EN -> BN) -> ``verify`` (LaBSE cosine >= tau, then ``--merge``) ->
``synthesise`` (Kandinsky 2.1 companion image + JSON sidecar) -> ``pack`` (triplet WebDataset
shards). Each stage is ``python -m shards.bengali.<stage>``, works shard by shard (SLURM array
tasks: ``--shard-index $SLURM_ARRAY_TASK_ID``), resumes where a killed run stopped and reports
per shard what it dropped and why.
"""
