"""Communicators: how tensors move between actors, and the ends generated loops call."""
