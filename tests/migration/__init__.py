"""Live migration and snapshots: the stream format, transports, status machine, failure and
cancel semantics, hostile peers, stalls, and real hv processes migrating end to end."""
