"""The project checks share nothing beyond tests.helpers (``ROOT``, the tool and KVM checks):
each one reads the repository or runs the packaged programs on its own."""
