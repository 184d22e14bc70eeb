"""Base layer: what every other layer may use — errors, the name registry, running
code inside a network namespace, hand-packed rtnetlink. Imports nothing of the project."""
