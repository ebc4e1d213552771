"""QMP: the protocol and server, option parsing, the hv-qmp client, and the machine's
commands and events through real hv processes."""
