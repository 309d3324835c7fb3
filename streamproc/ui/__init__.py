"""The retention team's web pages and report (streamproc ui, streamproc report)."""

UI_PORT = 6080  # `streamproc ui --port` (the worker's HTTP is on 6066)
