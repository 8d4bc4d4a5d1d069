"""PoD layer key sharing: similarity between layers, layer maps, and the output checkpoint."""
