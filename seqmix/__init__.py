"""seqmix: hybrid sequence models assembled from a short spec string."""
__version__ = "0.1.0"
