"""``rcnn serve``: an HTTP server with a web page over one or several trained detectors.

See :mod:`rcnn.serve.app` for the endpoints and docs/serve.md for the JSON schema and the page.
"""

from rcnn.serve.app import ServedModel, ServeSettings, create_app, sample_images
from rcnn.serve.limits import ApiError, Busy, TimedOut, WorkQueue

__all__ = ["ApiError", "Busy", "ServeSettings", "ServedModel", "TimedOut", "WorkQueue", "create_app", "sample_images"]
