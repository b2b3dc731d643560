"""Checkpoint conversion: other libraries' weights <-> this project's parameter checkpoints.

  conversion.py       the Python API (load_clip, load_image, load_aim, convert, export_aim)
  cli.py              `python -m aim_jax.convert ...` (also `aim-convert`)
  registry.py         the format registry and the conversion report
  formats/            one module per source format (CLIP, HF, timm, SigLIP, DINOv2, Swin, AIM)
  official_names.py   the official AIM state-dict names <-> parameter names
  torch_files.py      reading and writing PyTorch files without executing them
"""

from aim_jax.convert.conversion import (  # noqa: F401
    ACT_FORMATS, CLIP_FORMATS, Conversion, convert, convert_file, export_aim, load_aim,
    load_clip, load_image, read_state_dict, resize_positional_embedding,
    resize_temporal_embedding, verify, write)
