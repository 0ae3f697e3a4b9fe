"""Files: atomic writes, JSON, safetensors files with metadata, state dicts, images, run folders.

The lowest layer of the library: it knows files and tensors, never models, data sets or configs.

- :mod:`rcnn.io.files` — :func:`atomic_write` (every file the library writes goes through it),
  :func:`write_json`, :func:`read_json`, :func:`write_text`, :func:`write_bytes`;
- :mod:`rcnn.io.tensors` — safetensors files with a format tag and JSON metadata, and reading a
  weights file (safetensors or a ``torch.save`` file, never unpickling code) as a state dict;
- :mod:`rcnn.io.images` — reading image files (:func:`load_image`, :func:`image_size`);
- :mod:`rcnn.io.checkpoints` — the run folder: atomic checkpoints, resuming, finding ``last``.
"""

from rcnn.io.files import atomic_write, read_json, write_bytes, write_json, write_text

__all__ = ["atomic_write", "read_json", "write_bytes", "write_json", "write_text"]
