"""hv: a StratoVirt-compatible VMM whose guests live-migrate between KVM and Unicorn."""
__version__ = "0.2.0"
