"""Vagrant VM support: offline box builder (box.py) and host-side invoke tasks (tasks.py)."""
