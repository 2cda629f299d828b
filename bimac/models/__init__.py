"""Models: BiMAC (open_clip CoCa towers + patch decoder)."""

from bimac.models.bimac import BiMAC as BiMAC
from bimac.models.bimac import BiMACConfig as BiMACConfig
