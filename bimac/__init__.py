"""bimac: BiMAC vision-language pretraining and the PAL Bengali captioner."""

__version__ = "0.1.0"
