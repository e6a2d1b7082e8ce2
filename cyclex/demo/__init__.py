"""The embedded default (application layer): tiny demo generators, their tailored SDs, the phantom
classifier stand-in and `cyclex demo`. Nothing below the applications imports this package; the demo
builds its scorers and thresholds and hands them to the engine like any user would.
"""
