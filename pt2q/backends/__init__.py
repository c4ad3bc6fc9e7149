"""Backend lowerings, one sub-package per target. `inductor` (Intel CPU) runs on this machine."""
