"""mptcp-testbed: multipath Mininet topologies running real kernel MPTCP.

The packages are layers; each may import only the layers below it (checked by
tests/test_layers.py):

    testbed.tools     doctor, benchmarks, the VM, the CLI guard   (top)
    experiments, analysis   (outside this package, above the harness)
    testbed.harness   scenarios, runner, results schema and store, probes, workloads
    testbed.core      topology model, Testbed (Mininet), link emulation, events
    testbed.robe      RobE: robust session establishment over kernel MPTCP sockets
    testbed.mptcp     the kernel's MPTCP API: socket options, path-manager netlink
    testbed.stack     the user-space MPTCP stack (RFC 8684 endpoint of our own)
    testbed.base      errors, the name registry, namespaces and raw rtnetlink (bottom)
"""
