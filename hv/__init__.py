"""hv: a StratoVirt-compatible VMM whose guests live-migrate between KVM and Unicorn."""
__version__ = "0.1.0"
