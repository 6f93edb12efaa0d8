"""raycap: Show, Attend and Tell captioning for very large image collections, on Ray."""

__version__ = "0.1.0"
