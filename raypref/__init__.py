"""raypref: a Ray-distributed experiment platform for personalized LLM alignment."""

__version__ = "0.1.0"
