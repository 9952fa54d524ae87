"""Student models (pure `nn.Module` code, one module per family; the encoder-free VLMs in the
`students.encoder_free` package), plus the folder API re-exported from `students.loading`:
`load(path)` for exported student folders, `load_config(path)` for their configs (this
project's model families registered with the Auto classes first), `export_timm`, and `create_vision_student` for
timm-registered image classifiers (ours included). Failures to read a folder raise
`students.errors.StudentLoadError`. `write_remote_code` makes an exported folder load where this
project is not installed (`trust_remote_code=True`).
"""

from students.errors import StudentLoadError
from students.loading import (create_vision_student, export_timm, is_timm_folder, load, load_config, load_language_model,
                              register_families, skeleton)
from students.remote_code import write_remote_code

__all__ = ["StudentLoadError", "create_vision_student", "export_timm", "is_timm_folder", "load", "load_config",
           "load_language_model", "register_families", "skeleton", "write_remote_code"]
