"""Student models (pure `nn.Module` code, one module per family; the encoder-free VLMs in the
`students.encoder_free` package), plus the folder API re-exported from `students.loading`:
`load(path)` for exported student folders, `export_timm`, and `create_vision_student` for
timm-registered image classifiers (ours included). Failures to read a folder raise
`students.errors.StudentLoadError`. `write_remote_code` makes an exported folder load where this
project is not installed (`trust_remote_code=True`).
"""

from students.errors import StudentLoadError
from students.loading import create_vision_student, export_timm, is_timm_folder, load, load_language_model, skeleton
from students.remote_code import write_remote_code

__all__ = ["StudentLoadError", "create_vision_student", "export_timm", "is_timm_folder", "load", "skeleton",
           "load_language_model", "write_remote_code"]
