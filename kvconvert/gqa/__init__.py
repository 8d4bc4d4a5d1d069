"""KV-head merging: which heads merge (grouping), how (solve), and folding into weights (fold)."""
