"""``harness-calibrate``: noise measured on a device, constructed faults and regressions."""
