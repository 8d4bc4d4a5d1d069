"""Files copied verbatim into outputs that need remote code (they never import kvconvert)."""
