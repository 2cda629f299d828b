"""Tasks: what the engine trains (model, loader, weighted loss terms), one per stage."""

from bimac.tasks.pretrain import ObjectiveConfig as ObjectiveConfig
from bimac.tasks.pretrain import PretrainTask as PretrainTask
