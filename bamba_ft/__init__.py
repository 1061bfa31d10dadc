"""bamba_ft: fine-tune IBM Bamba and other Mamba-2 hybrids with exact padding-free batches."""

__version__ = "0.1.0"
