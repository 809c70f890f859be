"""Small shared helpers: images, runtime (device/dtype/logging), persistence."""
