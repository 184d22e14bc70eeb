"""Vagrant VM support: offline box builder (box.py) and host-side invoke tasks
(tasks.py). Part of the tools layer: uses testbed.base (errors, safe deletes)
and the tools' CLI guard."""
