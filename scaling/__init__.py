"""Scaling-law fits, ladder planning and loss prediction."""
