"""Evaluation prompts from a file the user gives (e.g. the 50 Koala prompts of P-Soups App. F).

The one loader of prompts files is `raypref.data.prompts.load_prompts` (``.txt``: one prompt a
line; ``.jsonl``: a ``prompt`` or ``instruction`` field a line); it is re-exported here for
the evaluation code that imports it from this module.
"""
from raypref.data.prompts import load_prompts

__all__ = ["load_prompts"]
