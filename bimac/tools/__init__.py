"""User-facing tools behind the ``bimac`` command: each module has ``main(argv)``."""
