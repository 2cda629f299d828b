"""One pure function per objective: tensors in, scalar or (scalar, stats) out."""

from bimac.losses.caption import caption_loss as caption_loss
from bimac.losses.caption import reward_weights as reward_weights
from bimac.losses.caption import scst_loss as scst_loss
from bimac.losses.contrastive import contrastive_loss as contrastive_loss
from bimac.losses.grounding import grounding_loss as grounding_loss
from bimac.losses.grounding import grounding_terms as grounding_terms
from bimac.losses.grounding import matched_patches as matched_patches
from bimac.losses.grounding import pointing_game as pointing_game
from bimac.losses.info_nce import info_nce as info_nce
from bimac.losses.pal import pal_loss as pal_loss
from bimac.losses.pal import pal_pool as pal_pool
from bimac.losses.pal import pal_weights as pal_weights
from bimac.losses.reconstruction import reconstruction_loss as reconstruction_loss
from bimac.losses.sinkhorn import cosine_cost as cosine_cost
from bimac.losses.sinkhorn import sinkhorn_ot as sinkhorn_ot
