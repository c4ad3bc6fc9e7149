"""Backend lowerings, one sub-package per target. `inductor` (Intel CPU) runs on this machine; `xpu`
(Intel GPU) needs an XPU device, and runs its graphs through Inductor's CPU path without one."""
