"""The `lego` command: the whole stack in one command, nodes, gateway, client and benchmarks."""
