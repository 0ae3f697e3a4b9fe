"""Sub-commands of the ``rcnn`` command line (see ``rcnn/cli.py``)."""
