"""relvid: relational video customization (DreamRelation) on Mochi with PyTorch Lightning."""

__version__ = "0.1.0"
