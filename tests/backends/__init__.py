"""The CPU backends behind hv_backends.base (Unicorn on x86_64 and aarch64, KVM): real guest
code on each, state round trips, kicks and dirty logging, the KVM ABI and CPUID."""
