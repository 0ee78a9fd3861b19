"""ezmia: privacy audits of fine-tuned LLM checkpoints with EZ-MIA, at cluster scale."""

__version__ = "0.1.0"
