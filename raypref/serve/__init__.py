"""Serving P-Soups policies with Ray Serve: per-request exact soups, batched (see app.py)."""
