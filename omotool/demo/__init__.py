"""``omotool demo``: the paper in miniature on a CPU (see ``omotool.demo.pipeline``)."""

from omotool.demo.pipeline import FAST, DemoRun, DemoSettings, run_demo

__all__ = ["FAST", "DemoRun", "DemoSettings", "run_demo"]
