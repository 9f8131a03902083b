"""``omotool demo``: the paper in miniature on a CPU (see ``omotool.demo.pipeline``)."""

from omotool.demo.pipeline import DemoRun, run_demo
from omotool.demo.settings import FAST, DemoSettings

__all__ = ["FAST", "DemoRun", "DemoSettings", "run_demo"]
