"""The procedural experiment: MUSIC and its ablations scored in pixels against the procedural world's ground truth."""
