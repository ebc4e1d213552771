"""Live migration and snapshots: stream format, transports, status machine.

``stream`` is the wire/file format, ``transport`` parses migration URIs and opens
connections and snapshot directories, ``status`` is the state machine and statistics
behind ``query-migrate``. The pre-copy engine (source rounds, destination) builds on them.
"""
