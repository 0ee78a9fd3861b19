"""Offline demo and test models: a tiny GPT-2 trained locally on stdlib docstrings."""
