"""Unit tests of the device models as pure register files: no process, no guest, no Linux
(``python -m pytest tests/devices`` runs this fast layer alone)."""
