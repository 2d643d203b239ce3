"""Training code for safegen's own small models (the embedded world's CLIP-architecture text encoder, ...).

Each module is a runnable entry point (``python -m safegen.training.<name>``) plus the functions it is made of.
"""
