"""Tools layer: doctor, benchmarks, the Vagrant VM, the CLI guard. May use every
layer below it, experiments and analysis."""
