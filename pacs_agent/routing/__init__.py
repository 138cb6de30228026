"""Routing: which series a study's methods use (portal-venous phase selection)."""
