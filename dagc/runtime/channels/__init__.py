"""Channels: how values move between the processes of a compiled DAG."""
